"""`model.dequantize=compiled`: in training, the 4-bit base layers' products dequantize their
weights with torch code that torch.compile makes one kernel of, instead of bitsandbytes'.

Why: a 4-bit layer's product dequantizes its whole weight to bf16 each time it runs, and with
gradient checkpointing that is three times a step (forward, recomputation, and backward's input
gradient): for Mistral-7B some 7 billion values written three times. On an H200 at 2048 tokens
a row bitsandbytes' dequantization took 12% of a step's kernel time (docs/benchmarks.md). For a
double-quantized weight bitsandbytes makes its scales in one kernel, adds their offset in a
second and expands the 4-bit values in a third, each into a tensor allocated for it and each
launched by Python code of its own: a fixed cost a step, so it weighs most in short rows. Here
the three are one compiled pass that reads the packed bytes and writes the weight.

The numbers are bitsandbytes' bit for bit (`tests/model/test_dequantize.py`): the same tables,
each fp32 product of table value and scale rounded once, the offset added to the rounded
scales, the value rounded once to the compute dtype (`dequantize_nf4` says how no compiler's
fused multiply-add can round otherwise). The product with the input is `F.linear` on the
dequantized weight, and the input's gradient a matmul with it, as bitsandbytes computes both on
a CPU and, on CUDA, from 1,537 rows a product up (fewer rows take its fused kernel, whose sums
round in another order).

On a CPU the compiled code is slower than bitsandbytes' C++ kernel (bench/dequantize.py): the
option is for GPUs.

Layers this does not cover keep bitsandbytes' path: a data type other than NF4, packed in
another dtype than bytes, a weight whose size is not a whole number of blocks, a layer with
hooks or a trained bias.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

# The values `model.dequantize` takes.
DEQUANTIZERS = ("bitsandbytes", "compiled")


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: tuple[int, ...],
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A 4-bit weight as bitsandbytes' `dequantize_4bit` makes it: two values a byte of
    `packed` (uint8, high nibble first), each its table value times its block's scale in fp32,
    rounded once to dtype. `absmax`: the blocks' scales in fp32; for a double-quantized weight
    their 8-bit codes, made scales as bitsandbytes' `dequantize_blockwise` makes them from
    `scales`: the second-level scales, their table, the offset and their block size."""
    if scales is not None:
        absmax2, code2, offset, blocksize2 = scales
        block = torch.arange(absmax.numel(), device=absmax.device) // blocksize2
        # bitsandbytes rounds the fp32 product, then the sum. A compiler may fuse an fp32
        # product and the add after it into one FMA, which rounds once; in fp64 the product of
        # two fp32 values is exact (24-bit significands), so rounded to fp32 it is the fp32
        # product's bits, and the add that follows it has no product to fuse with.
        product = code2[absmax.long()].double() * absmax2[block].double()
        absmax = product.float() + offset
    # Each byte against the shifts (4, 0), broadcast: the high and the low nibble side by side,
    # in one pointwise pass once compiled (a stack of the two would copy them first).
    shifts = torch.arange(4, -1, -4, dtype=torch.uint8, device=packed.device)
    nibbles = (packed.view(-1, 1) >> shifts) & 15
    values = code[nibbles.view(-1, blocksize).long()]
    return (values * absmax.view(-1, 1)).to(dtype).view(shape)


@functools.cache
def _compiled() -> object:
    # A kernel per weight shape and dtype: four for a Mistral decoder (q and o, k and v, gate
    # and up, down). Past torch's recompile limit a new one runs the eager code, same numbers.
    return torch.compile(dequantize_nf4, dynamic=False)


def dequantized(layer: nn.Module, dtype: torch.dtype, compiled: bool = True) -> torch.Tensor:
    """The 4-bit `layer`'s weight in `dtype`, bit for bit bitsandbytes' dequantization."""
    state = layer.weight.quant_state
    scales = None
    if state.nested:
        inner = state.state2
        scales = (inner.absmax, inner.code, state.offset, inner.blocksize)
    # Inside code being compiled (`model.compile`) the eager function is traced in its place.
    eager = not compiled or torch.compiler.is_compiling()
    expand = dequantize_nf4 if eager else _compiled()
    return expand(
        layer.weight.data,
        state.absmax,
        state.code,
        state.blocksize,
        tuple(state.shape),
        scales,
        dtype,
    )


class _Matmul4bit(torch.autograd.Function):
    """x @ W.T + bias for a frozen 4-bit W, as bitsandbytes' `MatMul4Bit`: W dequantized in
    forward and again in backward, never kept."""

    @staticmethod
    def forward(ctx, x, bias, layer, compiled):  # noqa: ANN001, ANN205
        # The layer on ctx, not saved: bitsandbytes' weights are kept by the model anyway, and
        # saved tensors would pass through checkpointing's and offloading's hooks.
        ctx.layer, ctx.compiled = layer, compiled
        return F.linear(x, dequantized(layer, x.dtype, compiled), bias)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        grad_x = None
        if ctx.needs_input_grad[0]:
            # bitsandbytes' order: dequantized in the weight's compute dtype, then cast.
            weight = dequantized(ctx.layer, ctx.layer.weight.quant_state.dtype, ctx.compiled)
            grad_x = torch.matmul(grad, weight.to(grad.dtype))
        return grad_x, None, None, None  # the bias is frozen (`covers`)


def base_product(layer: nn.Module, x: torch.Tensor, compiled: bool = True) -> torch.Tensor:
    """What bitsandbytes' `Linear4bit` returns for x already in its compute dtype."""
    bias = layer.bias
    if bias is not None:
        bias = bias.to(x.dtype)
    return _Matmul4bit.apply(x, bias, layer, compiled)


def covers(layer: nn.Module) -> bool:
    """Whether this 4-bit layer's dequantization can be `dequantize_nf4`'s (module docstring)."""
    state = getattr(layer.weight, "quant_state", None)
    # Packed in bytes: another storage dtype (for FSDP) would need a dtype view, which torch
    # 2.11's compiler does not lower.
    if state is None or state.quant_type != "nf4" or layer.weight.dtype != torch.uint8:
        return False
    numel = math.prod(state.shape)
    hooked = layer._forward_hooks or layer._forward_pre_hooks
    # A trained bias (lorafit's LoRA trains none) keeps bitsandbytes' product and its gradient.
    trained_bias = layer.bias is not None and layer.bias.requires_grad
    return numel % state.blocksize == 0 and not hooked and not trained_bias
