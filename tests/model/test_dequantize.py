"""`model.dequantize=compiled`: the 4-bit weights come out of the torch code bit for bit as
bitsandbytes dequantizes them, compiled and eager, as one kernel once compiled; training with
it gives bitsandbytes' losses and gradients bit for bit; layers it does not cover keep
bitsandbytes' path; eval never takes it."""

from __future__ import annotations

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from torch._inductor import metrics
from torch._inductor.utils import run_and_get_code

from helpers import (
    TINY,
    assert_bitwise_equal,
    compose_config,
    configure_as_fit_does,
    four_bit_linear,
)
from lorafit.model import dequantize as dq
from lorafit.model.lora_branch import FusedBranchLinear4bit
from lorafit.model.module import CausalLMModule

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _bitsandbytes(layer, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' dequantization of the layer's weight straight into `dtype`, as its
    fallback product makes it (functional.dequantize_4bit gives the state's dtype only)."""
    state = layer.weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(absmax, state.state2) + state.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        layer.weight.data, absmax, state.blocksize, "nf4", state.shape, dtype
    )


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain-scales"])
def test_the_weight_is_bitsandbytes_dequantization_bit_for_bit(compiled, nested):
    torch._dynamo.reset()  # more shapes and dtypes than torch compiles for one function
    for shape in ((64, 128), (256, 96)):  # one a square of blocks, one not
        for source in (torch.bfloat16, torch.float32):
            torch.manual_seed(sum(shape))
            layer = four_bit_linear(*shape, dtype=source, nested=nested)
            state = layer.weight.quant_state
            assert state.nested is nested
            want = bnb_functional.dequantize_4bit(layer.weight.data, state)
            assert_bitwise_equal([dq.dequantized(layer, state.dtype, compiled)], [want])
            for dtype in DTYPES:
                got = dq.dequantized(layer, dtype, compiled)
                assert_bitwise_equal([got], [_bitsandbytes(layer, dtype)])


def test_compiled_it_is_one_kernel_a_weight():
    """The scales' offset, both nibbles of each byte, the table and the cast in one pass (the
    first form stacked the nibbles: a copy and three kernels)."""
    layer = four_bit_linear(256, 96, dtype=torch.bfloat16)
    torch._dynamo.reset()
    metrics.reset()
    _, code = run_and_get_code(lambda: dq.dequantized(layer, torch.bfloat16))
    assert metrics.generated_kernel_count == 1, code


def test_a_layer_with_a_bias_gives_bitsandbytes_output_and_input_gradient():
    layer = four_bit_linear(64, 96, bias=True)
    torch.nn.init.normal_(layer.bias)
    layer.bias.requires_grad_(False)  # frozen, as under LoRA
    layer.compute_dtype, layer.compute_type_is_set = torch.bfloat16, True
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    results = []
    for product in (layer, lambda x: dq.base_product(layer, x)):
        out = product(x)
        results.append([out, *torch.autograd.grad(out.float().square().sum(), [x])])
    assert_bitwise_equal(results[1], results[0])


def test_it_covers_nf4_layers_without_hooks_only():
    assert dq.covers(four_bit_linear(64, 64))
    assert not dq.covers(four_bit_linear(64, 64, quant_type="fp4"))
    hooked = four_bit_linear(64, 64)
    hooked.register_forward_hook(lambda module, args, out: out)
    assert not dq.covers(hooked)
    assert not dq.covers(torch.nn.Linear(4, 4))


def _module(dequantize: str, fit: bool = True, device: str = "cpu") -> CausalLMModule:
    """The tiny QLoRA model as the canonical job trains it (peft's fp32 stream, dropout,
    checkpointed layers), built as `trainer.fit` builds it, with non-zero lora_B."""
    cfg = compose_config(
        [
            *TINY,
            "adapter=qlora",
            "adapter.dropout=0.3",
            "model.dtype=bfloat16",  # the 4-bit compute dtype of the canonical job
            "model.gradient_checkpointing=true",
            f"model.dequantize={dequantize}",
        ]
    )
    torch.manual_seed(0)
    module = CausalLMModule(model=cfg.model, adapter=cfg.adapter, optimizer={}, scheduler={})
    if fit:
        configure_as_fit_does(module, device)
    else:
        module.configure_model()
    for name, p in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return module.train()


def _step(module: CausalLMModule, tokens: int = 32, device: str = "cpu") -> list[torch.Tensor]:
    ids = torch.randint(3, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    batch = {"input_ids": ids, "position_ids": torch.arange(tokens, device=device)[None]}
    batch["labels"] = ids
    results = []
    for seed in (1, 2):  # twice: the second with the compiled kernels cached
        module.zero_grad()
        torch.manual_seed(seed)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss, _ = module._loss_sum(batch)
        loss.backward()
        results += [loss.detach(), *[p.grad for p in module.parameters() if p.requires_grad]]
    return results


def _counting(monkeypatch) -> list[torch.dtype]:
    """The dtypes of the weights the eager torch code dequantizes from now on."""
    calls = []
    expand = dq.dequantize_nf4

    def counted(*args):
        calls.append(args[-1])
        return expand(*args)

    monkeypatch.setattr(dq, "dequantize_nf4", counted)
    return calls


def _fused(module: CausalLMModule) -> list[FusedBranchLinear4bit]:
    return [m for m in module.model.modules() if isinstance(m, FusedBranchLinear4bit)]


def test_training_gives_bitsandbytes_losses_and_gradients_bit_for_bit(monkeypatch):
    module = _module("compiled")
    layers = _fused(module)
    assert layers and all(m.compiled_dequantize for m in layers)
    want = _step(_module("bitsandbytes"))
    for layer in layers:
        layer.compiled_dequantize = False  # the eager torch code, whose calls are counted
    calls = _counting(monkeypatch)
    eager = _step(module)
    monkeypatch.undo()
    for layer in layers:
        layer.compiled_dequantize = True
    compiled = _step(module)
    assert_bitwise_equal(eager, want)
    assert_bitwise_equal(compiled, want)
    # Each layer's weight three times a step (forward, recomputation, the input's gradient),
    # in the 4-bit compute dtype, but for the input gradients no one
    # needs: q, k and v of the first layer, whose input comes from the frozen embeddings.
    assert len(calls) == 2 * (3 * len(layers) - 3)
    assert set(calls) == {torch.bfloat16}


def test_eval_and_modules_not_fitting_keep_bitsandbytes(monkeypatch):
    module = _module("compiled")
    for layer in _fused(module):
        layer.compiled_dequantize = False
    calls = _counting(monkeypatch)
    with torch.no_grad():
        module.eval()(torch.randint(3, 1000, (1, 16)))
    assert not calls
    built = _module("compiled", fit=False)  # eval.py, generate.py and export.py build so
    assert all(m.compiled_dequantize is None for m in _fused(built))


MISTRAL_WEIGHTS = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_compiled_weights_are_bitsandbytes_bit_for_bit_one_kernel_each():
    """Against bitsandbytes' CUDA kernels, on Mistral-7B's four weight shapes, in Triton."""
    torch._dynamo.reset()
    metrics.reset()
    for out_features, in_features in MISTRAL_WEIGHTS:
        torch.manual_seed(out_features + in_features)
        layer = four_bit_linear(in_features, out_features, "cuda", dtype=torch.bfloat16)
        state = layer.weight.quant_state
        assert state.nested
        want = bnb_functional.dequantize_4bit(layer.weight.data, state)
        assert_bitwise_equal([dq.dequantized(layer, torch.bfloat16)], [want])
    assert metrics.generated_kernel_count == len(MISTRAL_WEIGHTS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_training_gives_bitsandbytes_losses_and_gradients_bit_for_bit():
    """With rows of 2048 tokens bitsandbytes' CUDA product dequantizes and multiplies too (from
    1,537 rows a product; fewer take its fused kernel, which sums in another order)."""
    results = []
    for dequantize in ("bitsandbytes", "compiled"):
        module = _module(dequantize, device="cuda")
        if dequantize == "compiled":
            assert all(m.compiled_dequantize for m in _fused(module))
        results.append(_step(module, tokens=2048, device="cuda"))
    assert_bitwise_equal(results[1], results[0])
