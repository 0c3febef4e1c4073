"""LoRA dropout moved into lora_A keeps peft's masks, losses and gradients exactly, keeps the
adapter's state dict, and keeps less for backward."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lorafit.model.lora_dropout import DropoutLinear, draw_mask, dropped_as, fuse_lora_dropout

# Each test with dropout's CPU form and its GPU form (conftest.py).
pytestmark = pytest.mark.usefixtures("dropout_forms")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16, bias=False)
        self.down = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _pair(p=0.3):
    """Two identical LoRA models, the second with its dropout fused."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = get_peft_model(
            Tiny(), LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["up", "down"])
        )
        for name, param in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(param, std=0.1)
        models.append(model.train())
    assert fuse_lora_dropout(models[1]) == 2
    return models


def _run(model, x, seed):
    torch.manual_seed(seed)
    loss = model(x).square().sum()
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, [x, *lora])


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_dropout_gives_peft_s_losses_and_gradients(autocast):
    peft_model, fused = _pair()
    x = torch.randn(3, 5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for seed in (1, 2):
            (loss, grads), (fused_loss, fused_grads) = (
                _run(m, x, seed) for m in (peft_model, fused)
            )
            # fp32: bit for bit (same mask, same products); bf16: the same up to its rounding.
            tolerance = {"rtol": 0, "atol": 0}
            torch.testing.assert_close(fused_loss, loss, **tolerance)
            for grad, expected in zip(fused_grads, grads, strict=True):
                torch.testing.assert_close(grad, expected, **tolerance)
    # Different seeds draw different masks: dropout really applies.
    assert not torch.equal(_run(fused, x, 1)[0], _run(fused, x, 2)[0])


def test_eval_mode_drops_nothing_and_the_state_dict_is_unchanged():
    peft_model, fused = _pair()
    assert fused.state_dict().keys() == peft_model.state_dict().keys()
    assert isinstance(fused.base_model.model.up.lora_A["default"], DropoutLinear)
    x = torch.randn(2, 8)
    peft_model.eval(), fused.eval()
    torch.testing.assert_close(fused(x), peft_model(x))


def test_less_is_kept_for_backward():
    def saved_bytes(model):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(64, 8)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(size for ptr, size in seen.items() if ptr not in params)

    peft_model, fused = _pair()
    assert saved_bytes(fused) < 0.8 * saved_bytes(peft_model)


def _bf16_base_pair(p):
    """bf16 base weights and fp32 adapters (peft's autocast_adapter_dtype), as a bf16 model
    under QLoRA or `model.dtype=bfloat16` has them."""
    peft_model, fused = _pair(p)  # p=0 too: peft's Identity dropout moves as well
    for model in (peft_model, fused):
        for name, param in model.named_parameters():
            if "lora_" not in name:
                param.data = param.data.bfloat16()
    return peft_model, fused


@pytest.mark.parametrize("p", [0.3, 0.0])
@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_with_fp32_adapters_matches_peft_without_its_fp32_copy(p, autocast):
    """peft casts each adapted layer's bf16 input to fp32; the fused path does not need to."""
    peft_model, fused = _bf16_base_pair(p)
    layer = fused.base_model.model.up
    assert layer.cast_input_dtype_enabled is False
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 5, 8).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        (loss, grads), (fused_loss, fused_grads) = (_run(m, x, 7) for m in (peft_model, fused))
    torch.testing.assert_close(fused_loss, loss, rtol=0, atol=0)
    for grad, expected in zip(fused_grads, grads, strict=True):
        assert grad.dtype == expected.dtype
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_bf16_inputs_are_kept_as_they_are_under_autocast():
    """What backward keeps: the layer's own bf16 input, not a fp32 copy per adapted layer."""

    def fp32_inputs_kept(model):
        kept = []

        def pack(t):
            if t.dtype == torch.float32 and t.shape[-1] in (8, 16) and t.dim() == 3:
                kept.append(t.shape)
            return t

        x = torch.randn(2, 64, 8).bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(x).float().sum()
        return kept

    peft_model, fused = _bf16_base_pair(0.3)
    assert fp32_inputs_kept(peft_model)  # peft keeps fp32 copies of the inputs
    assert fp32_inputs_kept(fused) == []


def test_backward_rebuilds_the_dropped_input_in_its_forward_dtype():
    """Backward runs outside autocast: rebuilt in the weight's fp32, the dropped input of an
    MLP-wide layer took three fp32 copies (input, mask, product), the step's memory peak."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Outputs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made: list[tuple[torch.dtype, torch.Size]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.made.append((out.dtype, out.shape))
            return out

    _, fused = _bf16_base_pair(0.3)
    x = torch.randn(2, 64, 8).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused(x).float().sum()
    with Outputs() as outputs:
        loss.backward()
    # The down layer's bf16 input (2 x 64 x 16): its mask and dropped copy are rebuilt here.
    down_input = [dtype for dtype, shape in outputs.made if shape == (2, 64, 16)]
    assert down_input
    assert torch.float32 not in down_input


CASTS = [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]


def _check_dropped_as(source, target, device):
    torch.manual_seed(0)
    x = (torch.randn(64, 96) * 3).to(source).to(device)
    scale = (torch.ones(()) / (1 - 0.3)).item()  # as `DropoutLinear.scale` makes it
    keep = draw_mask(x, 0.3)
    expected = (x * keep.bool() * scale).to(target)
    # Without and with the fp32 -0.0 that makes the one-pass form (`mixed_addcmul`).
    for zero in (None, torch.full((1,), -0.0, device=device)):
        got = dropped_as(x, keep, scale, target, zero)
        assert got.dtype == target
        assert torch.equal(got, expected)


@pytest.mark.parametrize(("source", "target"), CASTS)
def test_the_dropped_input_is_nn_dropout_s_product_cast(source, target):
    """Two passes (the product rounded into the target dtype, then the byte mask) give the
    product nn.Dropout makes in the input's dtype, cast: for fp16 into bf16 two roundings."""
    _check_dropped_as(source, target, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("source", "target"), CASTS)
def test_on_a_gpu_the_dropped_input_is_nn_dropout_s_product_cast(source, target):
    # CUDA's kernels compute a half product in fp32 and write it in the output's dtype: fp16
    # into bf16 would round once there, where the CPU rounds into the common dtype first.
    _check_dropped_as(source, target, "cuda")


def test_the_one_pass_constants_stay_fp32_on_the_weight_s_device_and_out_of_the_state_dict():
    layer = DropoutLinear(nn.Linear(8, 4, bias=False), 0.1)
    assert {k for k, _ in layer.state_dict().items()} == {"weight"}
    layer.to(torch.bfloat16)  # a cast of the model (bf16-true precision) casts its buffers
    assert layer.weight.dtype == torch.bfloat16
    for constant, value in ((layer.zero, -0.0), (layer.one, 1.0)):
        assert constant.dtype == torch.float32 and constant.shape == (1,)
        assert constant.item() == value and str(constant.item()) == str(value)  # -0.0 kept
    layer.to("meta").to_empty(device="cpu")  # storage left unset, as after building on meta
    assert str(layer.zero.item()) == "-0.0" and layer.one.item() == 1.0
