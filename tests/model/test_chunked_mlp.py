"""`model.mlp_chunk_tokens`: a chunked MLP gives the MLP's outputs and gradients (the weights'
up to the order of their sums), in a QLoRA model under bf16 autocast with either checkpoint
form too, while its backward's peak falls; it applies to training only, and with
`model.compile` the chunks' forward is what compiles."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import MistralConfig
from transformers.models.mistral.modeling_mistral import MistralMLP

from helpers import ROOT, TINY, compose_config, configure_as_fit_does, packed_test_module
from lorafit.model.chunked_mlp import ChunkedForward, chunk_mlps
from lorafit.model.module import CausalLMModule
from lorafit.model.swiglu import fuse_swiglu

sys.path.insert(0, str(ROOT / "bench"))
from peak_memory import running_peak  # noqa: E402

MIB = 2**20


def _mlp() -> MistralMLP:
    torch.manual_seed(0)
    mlp = MistralMLP(MistralConfig(hidden_size=32, intermediate_size=96, hidden_act="silu"))
    fuse_swiglu(mlp)
    return mlp


class _Calls:
    """Counts the calls of an MLP's forward and the tokens each got."""

    def __init__(self, forward):
        self.forward, self.tokens = forward, []

    def __call__(self, x):
        self.tokens.append(x.numel() // x.shape[-1])
        return self.forward(x)


def _outputs_and_grads(mlp, x, autocast):
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = mlp(x)
    # A gradient that differs by token, so that a chunk's output or gradient in another
    # chunk's place shows.
    grad = torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype)
    grads = torch.autograd.grad(out, [x, *mlp.parameters()], grad)
    return out, grads


@pytest.mark.parametrize("autocast", [False, True])
def test_a_chunked_mlp_gives_the_mlp_s_outputs_and_gradients(autocast):
    plain, chunked = _mlp(), _mlp()
    x = torch.randn(2, 10, 32)
    calls = _Calls(chunked.forward)
    chunked.forward = ChunkedForward(calls, tokens=3)
    out, grads = _outputs_and_grads(plain, x, autocast)
    chunked_out, chunked_grads = _outputs_and_grads(chunked, x, autocast)
    assert calls.tokens == [3] * 6 + [2]  # 20 tokens, 3 a call
    # Each token's arithmetic is the same but for the matrix products' blocking, which the
    # CPU's kernels choose by the number of rows; the weights' gradients sum the chunks'.
    # Under autocast every product rounds to bf16, so a sum cut otherwise rounds otherwise:
    # within two bf16 roundings.
    for got, expected in zip([chunked_out, *chunked_grads], [out, *grads], strict=True):
        if autocast:
            assert _relative_error(got.float(), expected.float()) < 2**-7
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_inputs_within_a_chunk_take_one_call():
    mlp = _mlp()
    calls = _Calls(mlp.forward)
    mlp.forward = ChunkedForward(calls, tokens=20)
    x = torch.randn(2, 10, 32)
    mlp(x)
    assert calls.tokens == [20]


def _step(chunk: int | None, reentrant: bool = True, tokens: int = 512):
    """Loss, LoRA gradients and backward's peak above its start (CPU allocator) of one step of
    the tiny QLoRA model with a wide MLP, as the canonical job runs it (fp32 stream, bf16
    autocast, checkpointed layers), no dropout."""
    module = packed_test_module(
        checkpointing=True,
        overrides=(
            "adapter=qlora",
            "model.source.intermediate_size=2048",
            f"model.reentrant_checkpointing={str(reentrant).lower()}",
        ),
    ).train()
    if chunk is not None:
        assert chunk_mlps(module.model, chunk) == 2  # the tiny model's two layers
    ids = torch.randint(3, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "position_ids": torch.arange(tokens)[None], "labels": ids}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = module._loss_sum(batch)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.profiler.record_function("backward"):
            loss.backward()
    peak, _, _ = running_peak(prof.profiler.kineto_results.events(), "backward")
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    return loss.detach(), grads, peak


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("reentrant", [True, False])
def test_the_qlora_model_trains_the_same_with_a_lower_backward_peak(reentrant):
    loss, grads, peak = _step(None, reentrant)
    chunked_loss, chunked_grads, chunked_peak = _step(128, reentrant)
    assert torch.equal(chunked_loss, loss)
    # The LoRA weights' gradients are bf16 products: four chunks round four partial sums to
    # bf16 where one product rounded its whole sum once. Within that rounding, 2**-8.
    errors = [_relative_error(g, e) for g, e in zip(chunked_grads, grads, strict=True)]
    assert max(errors) < 2**-8
    # An MLP-wide fp32 tensor is 512 x 2048 x 4 bytes, 4 MiB: the down projection's input
    # gradient and its parts, made whole-width at once without chunks, and a chunk at a time
    # with them, at least one such tensor less at the peak.
    assert peak - chunked_peak >= 4 * MIB, (peak / MIB, chunked_peak / MIB)


def test_chunks_apply_to_training_only():
    fitting = packed_test_module(overrides=("model.mlp_chunk_tokens=16",))
    fitting.model = None
    configure_as_fit_does(fitting)
    mlps = [layer.mlp for layer in fitting.model.get_base_model().model.layers]
    assert all(isinstance(vars(m)["forward"], ChunkedForward) for m in mlps)
    assert {m.forward.tokens for m in mlps} == {16}
    # eval.py, generate.py and export.py build the module outside a fit: the plain MLPs.
    evaluating = packed_test_module(overrides=("model.mlp_chunk_tokens=16",))
    layers = evaluating.model.get_base_model().model.layers
    assert not any("forward" in vars(layer.mlp) for layer in layers)


def _fit_built(overrides: tuple[str, ...]):
    module = packed_test_module(overrides=("adapter=qlora", "model.mlp_chunk_tokens=8", *overrides))
    module.model = None
    torch.manual_seed(0)
    configure_as_fit_does(module)
    for name, p in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return module.train()


def test_with_compile_the_chunks_forward_is_what_compiles():
    eager, compiled = _fit_built(()), _fit_built(("model.compile=true",))
    try:
        for layer in compiled.model.get_base_model().model.layers:
            assert layer.mlp._compiled_call_impl is None  # the loop over the chunks stays eager
            assert hasattr(layer.mlp.forward.chunk, "_torchdynamo_orig_callable")
            assert layer.post_attention_layernorm._compiled_call_impl is not None
        # 21 tokens: two chunks of 8 and one of 5, under bf16 autocast as on a GPU.
        ids = torch.randint(3, 1000, (1, 21), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "position_ids": torch.arange(21)[None], "labels": ids}
        losses = []
        for module in (eager, compiled):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = module._loss_sum(batch)
            loss.backward()
            losses.append(loss.detach())
        # Fused kernels round bf16 in another order (tests/model/test_compiled_layers.py).
        torch.testing.assert_close(losses[1], losses[0], rtol=2e-4, atol=0)
        for (name, got), expected in zip(
            compiled.named_parameters(), eager.parameters(), strict=True
        ):
            if got.requires_grad:
                assert _relative_error(got.grad, expected.grad) < 2**-6, name
    finally:
        compiled.teardown("fit")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_chunked_mlp_lowers_backward_s_peak():
    # 4-bit on CUDA (bitsandbytes' kernels), loaded bf16, bf16 autocast: the canonical job's
    # path, at a width where the MLP's fp32 tensors dominate the backward's transients.
    cfg = compose_config(
        [
            *TINY,
            "adapter=qlora",
            "adapter.dropout=0",
            "model.dtype=bfloat16",
            "model.source.hidden_size=512",
            "model.source.intermediate_size=4096",
            "model.source.num_hidden_layers=4",
            "model.gradient_checkpointing=true",
        ]
    )
    torch.manual_seed(0)
    module = CausalLMModule(model=cfg.model, adapter=cfg.adapter, optimizer={}, scheduler={})
    configure_as_fit_does(module, "cuda")
    module.cuda().train()
    for name, p in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    tokens = 4096
    ids = torch.randint(3, 1000, (1, tokens), generator=torch.Generator().manual_seed(0)).cuda()
    batch = {"input_ids": ids, "position_ids": torch.arange(tokens)[None].cuda(), "labels": ids}
    results = {}
    for name in ("plain", "chunked"):
        if name == "chunked":
            assert chunk_mlps(module.model, 1024) == 4
        module.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = module._loss_sum(batch)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
        grads = [p.grad.clone() for p in module.parameters() if p.requires_grad]
        results[name] = (loss.detach(), grads, peak)
    (loss, grads, peak), (chunked_loss, chunked_grads, chunked_peak) = results.values()
    # An MLP-wide fp32 tensor here: 4096 x 4096 x 4 bytes, 64 MiB; at least one less. Not
    # more: the chunks' kept `gate` and `up` still add up to one call's (chunked_mlp.py).
    assert peak - chunked_peak >= 64 * MIB, (peak / MIB, chunked_peak / MIB)
    # cuBLAS may pick other kernels for fewer rows: the loss within their rounding.
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-4, atol=0)
    # Each chunk's bf16 products rounded apart, and on CUDA attention's backward summing with
    # atomics: an H200 measured up to 1.02% (relative norm) against one call, the bound the
    # compiled layers' test allows for bf16 rounded in another order. A chunk misplaced or
    # left out parts by far more (the CPU tests above).
    errors = [_relative_error(g, e) for g, e in zip(chunked_grads, grads, strict=True)]
    assert max(errors) < 2**-6, max(errors)
