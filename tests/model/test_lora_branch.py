"""The LoRA branch of 4-bit layers as one autograd function gives peft's losses and gradients
bit for bit (fp32, bf16 autocast, fp32 or bf16 activations, with and without dropout, under
checkpointing), dispatches fewer operators, and leaves other states to peft's forward. With
`adapter.fp32_lora_add` a bf16 base output takes the update in fp32, in training and eval.
On CUDA, where nn.Dropout draws other masks (lora_dropout's docstring), peft's path is given
the branch's masks."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from helpers import (
    CountOps,
    MovedBytes,
    assert_bitwise_equal,
    four_bit_linear,
    packed_test_module,
)
from lorafit.model import lora_branch
from lorafit.model.lora_branch import (
    FusedBranchLinear4bit,
    add_updates_in_fp32,
    fuse_lora_branches,
)
from lorafit.model.lora_dropout import draw_mask, fuse_lora_dropout

# Each test with dropout's CPU form and its GPU form (conftest.py).
pytestmark = pytest.mark.usefixtures("dropout_forms")


class Tiny(nn.Module):
    is_loaded_in_4bit = True  # what peft reads to wrap bitsandbytes' layers

    def __init__(self, checkpointed: bool = False, device: str = "cpu"):
        super().__init__()
        self.up = four_bit_linear(64, 128, device)
        self.down = four_bit_linear(128, 64, device)
        self.checkpointed = checkpointed

    def block(self, x):
        return self.down(torch.relu(self.up(x)))

    def forward(self, x):
        return (
            checkpoint(self.block, x, use_reentrant=False) if self.checkpointed else self.block(x)
        )


def _model(
    p: float, fused: bool, checkpointed: bool = False, device: str = "cpu", alpha: int = 16
) -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(
        Tiny(checkpointed, device),
        LoraConfig(r=8, lora_alpha=alpha, lora_dropout=p, target_modules=["up", "down"]),
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts lora_B at zero: no gradient would reach lora_A
            nn.init.normal_(param, std=0.1)
    if fused:
        fuse_lora_dropout(model)
        assert fuse_lora_branches(model) == 2
    return model.to(device).train()


def _run(model, x, seed):
    torch.manual_seed(seed)
    loss = model(x).float().square().sum()
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, [x, *lora])


class _SameMasks:
    """Hands peft's dropout the masks the branch drew. On a GPU nn.Dropout draws its masks in
    its own kernel, in another order than the branch's `bernoulli_`, so seeds alone no longer
    pair the two paths' masks. peft's dropout here applies the mask the branch last drew for
    an input of its shape (up's and down's differ; a checkpoint's recomputation redraws the
    same one) as nn.Dropout applies its own on that device: on a CPU times a noise tensor of
    mask / (1 - p) in x's dtype (a bf16 scale, 1.4296875 for p = 0.3); on CUDA in its fused
    kernel, x times the mask times an fp32 scale, rounded once into x's dtype. `cuda_kernel`
    takes the second on any device."""

    def __init__(self, monkeypatch, p: float, reorder=lambda mask: mask, cuda_kernel=False):
        self.p = p
        self.masks: dict[tuple[int, ...], torch.Tensor] = {}
        self.replayed = 0
        self.cuda_kernel = cuda_kernel

        def draw(x, p):
            self.masks[tuple(x.shape)] = mask = reorder(draw_mask(x, p))
            return mask

        monkeypatch.setattr(lora_branch, "draw_mask", draw)

    def give_to(self, model: nn.Module) -> None:
        masks = self

        class Replay(nn.Module):
            def forward(self, x):
                masks.replayed += 1
                mask = masks.masks[tuple(x.shape)]
                if masks.cuda_kernel or x.device.type == "cuda":
                    scale = (torch.ones(()) / (1 - masks.p)).item()  # fp32, as the kernel's
                    return (x.float() * mask * scale).to(x.dtype)
                return x * mask.to(x.dtype).div_(1 - masks.p)

        for module in model.modules():
            if isinstance(getattr(module, "lora_dropout", None), nn.ModuleDict):
                module.lora_dropout["default"] = Replay()


def _compare(autocast, activations, p, checkpointed, device="cpu", alpha=16, same_masks=None):
    peft_model = _model(p, False, checkpointed, device, alpha)
    fused = _model(p, True, checkpointed, device, alpha)
    if same_masks:
        same_masks.give_to(peft_model)
    x = torch.randn(2, 7, 64, dtype=activations, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        for seed in (1, 2):
            fused_loss, fused_grads = _run(fused, x, seed)  # first: peft's may take its masks
            loss, grads = _run(peft_model, x, seed)
            assert_bitwise_equal([fused_loss, *fused_grads], [loss, *grads])
    if same_masks:  # both layers, both seeds: peft drew none of its own
        assert same_masks.replayed >= 4
    if p:  # other seeds draw other masks: dropout applies
        assert not torch.equal(_run(fused, x, 1)[0], _run(fused, x, 2)[0])


PRECISIONS = [  # (autocast, activations)
    (False, torch.float32),
    (False, torch.bfloat16),
    (True, torch.float32),
    (True, torch.bfloat16),
]


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize(("autocast", "activations"), PRECISIONS)
def test_the_branch_gives_peft_s_losses_and_gradients(autocast, activations, p, checkpointed):
    _compare(autocast, activations, p, checkpointed)


@pytest.mark.parametrize(("autocast", "activations"), PRECISIONS)
def test_a_scaling_not_a_power_of_two_is_multiplied_as_peft_does(autocast, activations):
    # alpha 12, r 8: scaling 1.5, which the add cannot fold in exactly (alpha 16: 2.0 above).
    _compare(autocast, activations, 0.3, False, alpha=12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("activations", [torch.float32, torch.bfloat16])
def test_on_a_gpu_the_branch_gives_peft_s_losses_and_gradients(activations, monkeypatch):
    # cuBLAS and bitsandbytes' CUDA kernels under bf16 autocast, the same masks on both paths.
    _compare(True, activations, 0.3, True, "cuda", same_masks=_SameMasks(monkeypatch, 0.3))


@pytest.mark.parametrize(("autocast", "activations"), PRECISIONS)
def test_given_the_branch_s_masks_peft_s_path_computes_the_same_numbers(
    autocast, activations, monkeypatch
):
    """The GPU test's pairing of masks, on the CPU with the branch's masks drawn in another
    order than nn.Dropout's, as on a GPU."""
    flipped = _SameMasks(monkeypatch, 0.3, reorder=lambda mask: mask.flip(-1))
    _compare(autocast, activations, 0.3, True, same_masks=flipped)


@pytest.mark.parametrize(("autocast", "activations"), PRECISIONS)
def test_the_branch_gives_what_peft_computes_under_cuda_autocast(
    autocast, activations, monkeypatch
):
    """peft's path as a GPU runs it, on the CPU. peft asks `torch.is_autocast_enabled()`, which
    without a device reads CUDA's autocast: under it peft does not cast x to lora_A's fp32, so
    its dropout meets bf16 activations as they come, and CUDA's dropout kernel scales them in
    fp32 (`_SameMasks`). Here that check reads the CPU's autocast and the dropout computes as
    CUDA's kernel; a bf16 scale (the CPU's nn.Dropout) would give other numbers."""
    is_enabled = torch.is_autocast_enabled
    monkeypatch.setattr(
        torch, "is_autocast_enabled", lambda device=None: is_enabled(device or "cpu")
    )
    masks = _SameMasks(monkeypatch, 0.3, reorder=lambda mask: mask.flip(-1), cuda_kernel=True)
    _compare(autocast, activations, 0.3, True, same_masks=masks)


def test_the_branch_dispatches_fewer_operators():
    """Against peft's layer with the dropout already fused into lora_A, the path before."""
    x = torch.randn(2, 7, 64, requires_grad=True)
    before = _model(0.3, False)
    fuse_lora_dropout(before)
    counts = []
    for model in (before, _model(0.3, True)):
        _run(model, x, 0)  # the dropout scales are made once
        with torch.autocast("cpu", dtype=torch.bfloat16), CountOps() as count:
            _run(model, x, 1)
        counts.append(count.n)
    assert counts[1] <= 0.9 * counts[0], counts


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_the_input_s_two_gradients_are_summed_in_place(p):
    """x feeds the 4-bit layer and the branch; autograd adds one gradient into the other in
    place only if the first is a tensor it alone holds (not a view of another), else it
    allocates the sum (for down_proj an MLP-wide fp32 tensor). A dispatch mode would stop
    autograd summing in place, so the profiler watches."""
    model = _model(p, True)
    x = torch.randn(2, 7, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.base_model.model.down(x).float().square().sum()
    with torch.profiler.profile(record_shapes=True) as prof:
        loss.backward()
    sums = [e.name for e in prof.events() if e.input_shapes[:1] == [list(x.shape)]]
    sums = [name for name in sums if name in ("aten::add", "aten::add_")]
    assert sums == ["aten::add_"]


def test_the_gpu_s_forms_move_fewer_bytes(monkeypatch):
    """On a GPU the dropout product, the base output's widening in the add and the input
    gradient's mask, widening and scale each take one pass (`lora_dropout.one_pass`), and the
    dropped input is kept rather than remade: the bytes the operators outside the matrix
    products read and write, an fp32 input under bf16 autocast as peft's stream gives it."""
    from lorafit.model import lora_dropout

    x = torch.randn(2, 7, 64, requires_grad=True)
    moved = {}
    for form, devices in (("cpu", frozenset({"cpu"})), ("gpu", frozenset())):
        monkeypatch.setattr(lora_dropout, "CPU_FORM_DEVICES", devices)
        model = _model(0.3, True)
        _run(model, x, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16), MovedBytes() as count:
            _run(model, x, 1)
        moved[form] = count.n
    # 0.79 here (436,532 / 554,780 bytes).
    assert moved["gpu"] <= 0.8 * moved["cpu"], moved


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_a_bf16_product_of_an_fp32_input_is_kept_instead_of_the_input(p):
    """Under autocast from peft's fp32 stream lora_A's input is bf16: backward keeps that
    (half the bytes, nothing to remake) and not the fp32 input, which is then freed where no
    other layer keeps it (down_proj's MLP-wide input)."""
    model = _model(p, True)
    x = torch.randn(2, 7, 128)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.shape, t.data_ptr()))
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.base_model.model.down(x.requires_grad_())
    assert all(ptr != x.data_ptr() for _, _, ptr in saved)
    assert (torch.bfloat16, x.shape) in [(dtype, shape) for dtype, shape, _ in saved]


class _BiasedTiny(Tiny):
    def __init__(self):
        super().__init__()
        self.up = four_bit_linear(64, 128, bias=True)


@pytest.mark.parametrize("kind", ["bias", "hook"])
def test_4bit_layers_with_a_bias_or_hooks_keep_peft_s_numbers_and_what_hooks_see(kind):
    def model(fused):
        torch.manual_seed(0)
        tiny = _BiasedTiny() if kind == "bias" else Tiny()
        calls = []
        if kind == "hook":  # a forward hook on the 4-bit layer must still run
            tiny.up.register_forward_hook(lambda m, a, out: calls.append(out.dtype))
        peft_model = get_peft_model(
            tiny, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.3, target_modules=["up", "down"])
        )
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(param, std=0.1)
        if fused:
            fuse_lora_dropout(peft_model)
            fuse_lora_branches(peft_model)
        return peft_model.train(), calls

    (plain, plain_calls), (fused, fused_calls) = model(False), model(True)
    x = torch.randn(2, 7, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _run(plain, x, 1)
        fused_loss, fused_grads = _run(fused, x, 1)
    assert_bitwise_equal([fused_loss, *fused_grads], [loss, *grads])
    assert fused_calls == plain_calls


def test_other_states_take_peft_s_forward():
    model = _model(0.3, True)
    layer = model.base_model.model.up
    assert type(layer) is FusedBranchLinear4bit
    assert model.state_dict().keys() == _model(0.3, False).state_dict().keys()
    x = torch.randn(2, 7, 64)
    # eval: no dropout, no graph: peft's own forward, same output as the unfused model's
    expected = _model(0.3, False).eval().base_model.model.up(x)
    assert torch.equal(layer.eval()(x), expected)
    with model.disable_adapter():
        assert torch.equal(layer.train()(x), layer.base_layer(x))


def _added_in_fp32(layer, x):
    """A 4-bit LoRA layer of the unfused peft model, its update added in fp32 by autograd."""
    name = "default"
    lora_a = layer.lora_A[name]
    dropped = layer.lora_dropout[name](x.to(lora_a.weight.dtype))  # as peft casts
    update = layer.lora_B[name](lora_a(dropped))
    return layer.base_layer(x).float() + update * layer.scaling[name]


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_with_fp32_add_a_bf16_base_output_takes_the_update_in_fp32(p, checkpointed):
    fused = _model(p, True, checkpointed)
    assert add_updates_in_fp32(fused) == 2
    reference = _model(p, False)
    up, down = reference.base_model.model.up, reference.base_model.model.down

    def block(x):  # Tiny.block, each layer's add in fp32
        return _added_in_fp32(down, torch.relu(_added_in_fp32(up, x)))

    x = torch.randn(2, 7, 64, dtype=torch.bfloat16, requires_grad=True)
    lora = [w for w in reference.parameters() if w.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for seed in (1, 2):
            torch.manual_seed(seed)
            out = block(x)
            assert out.dtype == torch.float32  # up's bf16 input: widened; down's is fp32
            loss = out.square().sum()
            grads = torch.autograd.grad(loss, [x, *lora])
            fused_loss, fused_grads = _run(fused, x, seed)
            assert_bitwise_equal([fused_loss, *fused_grads], [loss, *grads])
        # eval: no dropout, the add in fp32 too
        fused.eval(), reference.eval()
        with torch.no_grad():
            assert torch.equal(fused(x), block(x))


def test_an_update_below_half_a_bf16_step_reaches_the_output_only_in_fp32():
    model = _model(0.0, True)
    layer = model.base_model.model.up
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(1e-4)  # the update ~1e-4 of the base output
    x = torch.randn(64, 64, dtype=torch.bfloat16)
    name = "default"
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        base = layer.base_layer(x).float()
        update = (layer.lora_B[name](layer.lora_A[name](x)) * layer.scaling[name]).float()
        bf16_sum = layer(x)
        add_updates_in_fp32(model)
        fp32_sum = layer(x)
    assert (update != 0).float().mean() > 0.99
    # in bf16 nearly every element rounds back to the base output: the update is lost
    assert bf16_sum.dtype == torch.bfloat16
    assert (bf16_sum.float() == base).float().mean() > 0.9
    # in fp32 it arrives, off by no more than the sum's own fp32 rounding
    assert fp32_sum.dtype == torch.float32
    assert ((fp32_sum - base - update).abs() <= base.abs() * 2**-23).all()


def _o_proj_dtype(*overrides: str) -> torch.dtype:
    module = packed_test_module(overrides=("adapter=qlora", *overrides)).train()
    layer = module.model.get_base_model().model.layers[0].self_attn.o_proj
    seen = []
    hook = layer.register_forward_hook(lambda m, a, out: seen.append((a[0].dtype, out.dtype)))
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "position_ids": torch.arange(16)[None], "labels": ids}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module._loss_sum(batch)
    hook.remove()
    assert seen[0][0] == torch.bfloat16  # the attention's output
    return seen[0][1]


def test_the_option_widens_o_proj_on_the_fp32_stream_only():
    assert _o_proj_dtype() == torch.float32  # the default
    assert _o_proj_dtype("adapter.fp32_lora_add=false") == torch.bfloat16  # peft's
    # bf16 by choice: the option leaves these layers alone
    assert _o_proj_dtype("adapter.autocast_outputs=true") == torch.bfloat16
    assert _o_proj_dtype("adapter.upcast_unquantized=false") == torch.bfloat16
