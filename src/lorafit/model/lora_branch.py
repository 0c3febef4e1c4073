"""The LoRA branch of a 4-bit layer in training as one autograd function: the same numbers as
peft's path, in fewer operators.

peft's `Linear4bit.forward` computes `base(x).clone() + lora_B(lora_A(dropout(x))) * scaling`.
Each piece is its own module call and autograd node: under autocast every linear casts its
weight, folds the input to two dimensions and unfolds the output, and autograd adds a node per
view, cast and product; the `clone` is a full copy of the base output kept from older torch
versions, which the out-of-place add after it makes needless. A decoder layer has seven such
layers, run three times a step with gradient checkpointing (forward, recomputation, backward),
and at 2048 tokens a row a GPU waits on the host that dispatches them (docs/benchmarks.md).

Here the branch (dropout, lora_A, lora_B, scale) and its add to the base output are one
autograd function whose losses and gradients are bit for bit peft's
(`tests/model/test_lora_branch.py`), with the dropout mask drawn as `nn.Dropout` draws it and
kept as one byte a value (`lora_dropout.py`). It makes autograd's operations for peft's path,
in the same order, dtypes and layouts, but where fewer give the same bits:

- the dropped input is written in the matmul's dtype as it is made (`dropped_as`: on a GPU one
  pass over an fp32 input instead of four), and kept for backward where it is narrower than
  the input (`kept_input`), so backward does not remake it;
- x's gradient from the branch is masked, widened and scaled in one pass on a GPU
  (`input_grad`), and made as a tensor of its own, into which autograd adds the base layer's
  gradient in place;
- the base layer's output comes in bitsandbytes' compute dtype and is widened to x's dtype in
  the add, not by bitsandbytes (on a GPU in the add's own pass, `mixed_addcmul`), so backward
  casts the incoming gradient to bf16 once for the base layer and the branch instead of twice;
- a scaling that is a power of two (alpha 16 and r 32, alpha 2r) is applied by the add in
  forward, and in backward to lora_B's rank-wide gradients instead of the output-wide one, as
  its products are exact: an output-wide pass fewer in each, and no output-wide tensor made
  in backward.

Layers in any other state (eval, but for the fp32 add below; merged, adapters disabled,
several active adapters, a variant such as DoRA, extra arguments) take peft's own forward.

`adapter.fp32_lora_add`: under autocast a 4-bit layer whose input is bf16 (with
peft's fp32 stream, `o_proj` after the attention) gets a bf16 base output, and peft adds the
update to it in bf16, which rounds away any update smaller than half a bf16 step of the base
output: a fresh or slowly moving adapter's change to the residual stream is partly lost in
forward while backward trains as if it arrived. With the option the add is made in fp32 and
the layer returns fp32, as the layers with fp32 inputs already do; in training and in eval.
"""

from __future__ import annotations

import math

import torch
from peft.tuners.lora.bnb import Linear4bit
from torch import nn

from lorafit.model.dequantize import base_product, covers
from lorafit.model.loaded_embeddings import HALF
from lorafit.model.lora_dropout import (
    DropoutLinear,
    InputMeta,
    draw_mask,
    dropped_as,
    input_grad,
    kept_input,
    lora_a_input,
    matmul_dtype,
    matmul_input,
    mixed_addcmul,
    one_pass,
)


def _widened(base: torch.Tensor) -> torch.Tensor:
    """A half base output in fp32, for the add of `adapter.fp32_lora_add` (module docstring)."""
    return base.float() if base.dtype in HALF else base


class _LoraBranch(torch.autograd.Function):
    """base + lora_B(lora_A(dropout(x))) * scaling, with lora_A, lora_B the adapter's weights
    and base the base layer's output. The add is inside so that backward holds the branch's
    own gradient only as long as it needs it: autograd keeps a function's incoming gradient
    for the whole call, and at the step's peak (`down_proj`'s lora_A gradients) peft's path
    had already freed it."""

    @staticmethod
    def forward(ctx, x, base, weight_a, weight_b, p, scale, scaling, sum_dtype, zero, one):  # noqa: ANN001, ANN205
        dtype = matmul_dtype(x, weight_a)
        compute = matmul_input(x, weight_a)  # x as is under autocast (lora_dropout.py)
        if p > 0:
            keep = draw_mask(x, p)
            dropped = dropped_as(compute, keep, scale, dtype, zero)
        else:
            keep, dropped = None, compute.to(dtype)
        # What F.linear makes of a 3-d input: a 2-d product on the folded input.
        a_cast, b_cast = weight_a.to(dtype), weight_b.to(dtype)
        hidden = dropped.reshape(-1, x.shape[-1]).mm(a_cast.t())
        product = hidden.mm(b_cast.t())
        ctx.save_for_backward(kept_input(x, dropped), keep, a_cast, b_cast, hidden, zero)
        ctx.scale, ctx.scaling = scale, scaling
        ctx.x = InputMeta(x, compute.dtype)
        ctx.weight_dtypes = (weight_a.dtype, weight_b.dtype)
        ctx.branch_dtype = product.dtype
        ctx.base_dtype = base.dtype
        product = product.view(*x.shape[:-1], product.shape[-1])
        # The base output widened to the sum's dtype here rather than in bitsandbytes (its
        # cast back to x's dtype), so that backward casts the gradient once for both.
        autocast = torch.is_autocast_enabled(x.device.type)
        if _exact_scaling(scaling) and (autocast or product.dtype == sum_dtype):
            # A power of two scales exactly: the product rounded then scaled, and the add, in
            # one pass (the add computes in fp32 at least, so nothing rounds between); on a
            # GPU with the base output's widening in the same pass.
            if sum_dtype == torch.float32 and one_pass(x.device):
                return mixed_addcmul(base, product, one, scaling, sum_dtype)
            return torch.add(base.to(sum_dtype), product, alpha=scaling)
        base = base.to(sum_dtype)
        branch = product * scaling
        # peft casts the branch to the base output's dtype where no autocast runs; under
        # autocast the add promotes it, which gives the same numbers (bf16 to fp32 is exact).
        if branch.dtype != sum_dtype and not autocast:
            branch = branch.to(sum_dtype)
        return base + branch

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        saved, keep, a_cast, b_cast, hidden, zero = ctx.saved_tensors
        needs_x, needs_base, needs_a, needs_b = ctx.needs_input_grad[:4]
        # The branch's gradient in its dtype (what autograd gives a bf16 branch of an fp32
        # sum), the product by scaling, then lora_B's product as autograd's MmBackward makes it.
        grad_out = grad.to(ctx.branch_dtype)
        # A half base output takes the same cast of the fp32 gradient: made once.
        grad_base = grad_out if ctx.base_dtype == grad_out.dtype else grad.to(ctx.base_dtype)
        grad_b_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_b = None
        if _exact_scaling(ctx.scaling):
            # Scaled after lora_B's products, on their rank-wide results, not before on the
            # output-wide gradient: a power of two commutes with every rounding in them.
            if needs_b:
                grad_b = (grad_b_out.t().mm(hidden) * ctx.scaling).to(ctx.weight_dtypes[1])
            grad_hidden = grad_b_out.mm(b_cast).mul_(ctx.scaling)
        else:
            grad_b_out = grad_b_out * ctx.scaling
            if needs_b:
                grad_b = grad_b_out.t().mm(hidden).to(ctx.weight_dtypes[1])
            grad_hidden = grad_b_out.mm(b_cast)
        # Freed before lora_A's gradients, the backward's peak (for down_proj: its input-wide
        # mask, product and casts), as autograd frees them between peft's separate nodes.
        del grad_out, grad_b_out
        # lora_A with its dropout: its gradients as lora_dropout.py computes them.
        grad_x = grad_a = None
        if needs_x:
            grad_x = input_grad(grad_hidden, a_cast, keep, ctx.scale, ctx.x, zero)
        if needs_a:
            dropped = lora_a_input(saved, keep, ctx.scale, ctx.x, grad_hidden.dtype, zero)
            grad_a = (grad_hidden.t() @ dropped).to(ctx.weight_dtypes[0])
        return grad_x, grad_base if needs_base else None, grad_a, grad_b, *[None] * 6


def _exact_scaling(scaling: float) -> bool:
    """Whether scaling is a power of two (alpha 16 and r 32, alpha 2r...): a product by it is
    exact in any float dtype short of its range's ends."""
    return scaling > 0 and math.frexp(scaling)[0] == 0.5


def _plain_adapter(layer: nn.Module) -> str | None:
    """The one adapter a plain LoRA forward runs on this layer, if it is in that state."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    name = active[0]
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if not isinstance(lora_a, DropoutLinear) or lora_b.bias is not None:
        return None
    if not isinstance(layer.lora_dropout[name], nn.Identity):
        return None
    return name


class FusedBranchLinear4bit(Linear4bit):
    """peft's 4-bit LoRA layer with its training branch as one autograd function; the class
    its layers are switched to (same state, same state dict)."""

    fp32_add = False  # `adapter.fp32_lora_add`, set by `add_updates_in_fp32`
    # `model.dequantize`, set by `dequantize_in_torch`: None for bitsandbytes' dequantization,
    # else whether the torch code that replaces it is compiled (tests run it eager too).
    compiled_dequantize: bool | None = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = _plain_adapter(self) if not args and not kwargs else None
        widen = self.fp32_add and torch.is_autocast_enabled(x.device.type)
        if name is None or not (self.training or widen):
            return super().forward(x, *args, **kwargs)
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        if not self.training:
            # peft's eval forward (no dropout; autocast casts for the adapter's matmuls) with
            # the add in fp32, as in training.
            return _widened(self.base_layer(x)) + lora_b(lora_a(x)) * self.scaling[name]
        base, sum_dtype = self._half_base(x)
        if widen and sum_dtype in HALF:
            sum_dtype = torch.float32
        return _LoraBranch.apply(
            x,
            base,
            lora_a.weight,
            lora_b.weight,
            lora_a.p,
            lora_a.scale(),
            self.scaling[name],
            sum_dtype,
            lora_a.zero,
            lora_a.one,
        )

    def _half_base(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        """The base layer's output in its compute dtype, and the dtype bitsandbytes would have
        returned it in: it casts x to its compute dtype and its output back to x's; given x
        cast already it returns its own, and `_LoraBranch` makes the cast back (`sum_dtype`).
        A layer with hooks (`adapter.autocast_outputs` adds one) gets x as it is, so they see
        what they would see under peft, and returns what they make of it."""
        base = self.base_layer
        hooked = base._forward_hooks or base._forward_pre_hooks
        if base.compute_type_is_set and base.compute_dtype is not None and not hooked:
            half = x.to(base.compute_dtype)
            if self.compiled_dequantize is not None:
                return base_product(base, half, self.compiled_dequantize), x.dtype
            return base(half), x.dtype
        out = base(x)
        return out, out.dtype


def fuse_lora_branches(model: nn.Module) -> int:
    """Switch each peft 4-bit LoRA layer to `FusedBranchLinear4bit`; returns how many."""
    fused = 0
    for module in model.modules():
        if type(module) is Linear4bit:
            module.__class__ = FusedBranchLinear4bit
            fused += 1
    return fused


def dequantize_in_torch(model: nn.Module, compiled: bool = True) -> int:
    """`model.dequantize=compiled`: the fused 4-bit layers' base products in training dequantize
    their weights with `lorafit.model.dequantize`'s code where it covers them; returns how
    many layers."""
    layers = [
        m for m in model.modules() if isinstance(m, FusedBranchLinear4bit) and covers(m.base_layer)
    ]
    for layer in layers:
        layer.compiled_dequantize = compiled
    return len(layers)


def add_updates_in_fp32(model: nn.Module) -> int:
    """`adapter.fp32_lora_add`: the fused 4-bit layers add their update to a half base output
    in fp32 under autocast (module docstring); returns how many layers."""
    layers = [m for m in model.modules() if isinstance(m, FusedBranchLinear4bit)]
    for layer in layers:
        layer.fp32_add = True
    return len(layers)
