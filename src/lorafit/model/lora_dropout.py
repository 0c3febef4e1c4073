"""LoRA dropout that keeps a one-byte mask for backward instead of a dropped copy of the input.

peft computes `lora_B(lora_A(dropout(x)))`: autograd then keeps, for every adapted layer, the
dropped input (4 bytes a value in fp32) for lora_A's weight gradient, besides dropout's own
mask, although `x` itself is already kept by the layers around it. For SmolLM2-135M on a
512-token row that is about 300 MB of a step's 1.1 GB of saved activations. Here dropout and
lora_A are one autograd function that keeps `x` (shared, no copy) and the mask as bytes,
and rebuilds the dropped input in backward.

The mask is drawn with the very call `nn.Dropout` makes (`bernoulli_(1 - p)`, over a tensor
shaped like `x`), so the random stream, the masks and therefore the losses are those of peft's
own path: same seed, same numbers (`tests/model/test_lora_dropout.py`).

peft also casts each adapted layer's input to the adapter's dtype first: with bf16 base weights
and fp32 adapters, a full fp32 copy of the input per adapted layer, which autocast then casts
back to bf16 for lora_A's matmul, and which backward keeps. Layers whose lora_A is a
`DropoutLinear` (any dropout, 0 included) skip that cast: `DropoutLinear` casts only where no
autocast does it, and keeps the input as the layer received it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _DropoutLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, p, scale):  # noqa: ANN001, ANN205
        # The mask nn.Dropout draws: the same bernoulli_ call on the same random stream, here
        # into one byte a value. `scale` is its 1 / (1 - p) (see `DropoutLinear.scale`).
        keep = draw_mask(x, p)
        compute = matmul_input(x, weight)
        # Dropped straight into the dtype the matmul takes (autocast's cast made here).
        out = F.linear(dropped_as(compute, keep, scale, matmul_dtype(x, weight)), weight)
        ctx.save_for_backward(x, weight, keep)
        ctx.scale = scale
        ctx.compute_dtype = compute.dtype  # backward rebuilds the dropped input in it
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, weight, keep = ctx.saved_tensors
        grads = dropout_linear_grads(
            grad_out.reshape(-1, grad_out.shape[-1]),  # the matmul's dtype: bf16 under autocast
            x,
            keep,
            weight,
            ctx.scale,
            ctx.compute_dtype,
            ctx.needs_input_grad[:2],
        )
        return *grads, None, None


def dropout_linear_grads(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    keep: torch.Tensor | None,
    weight: torch.Tensor,
    scale: torch.Tensor,
    compute_dtype: torch.dtype,
    needs: tuple[bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of x and weight for `linear(x * keep * scale, weight)` (keep None: no
    dropout), given the output's gradient folded to 2-d, with autograd's own products. The
    dropped input is rebuilt as forward made it, in `compute_dtype` rounded to the matmul's:
    backward runs outside autocast, and rebuilding a bf16 input in the weight's fp32 (three
    MLP-wide copies) was once the step's memory peak."""
    flat = x.to(compute_dtype).reshape(-1, x.shape[-1])
    keep = keep.view(flat.shape) if keep is not None else None
    grad_x = grad_weight = None
    if needs[0]:
        # Made in x's shape rather than viewed into it: where x has another consumer (the base
        # layer), autograd adds the other gradient in place into a tensor it alone holds, but
        # into a view it allocates the sum anew (for down_proj an MLP-wide fp32 tensor, at
        # the step's memory peak).
        grad_dropped = torch.empty(x.shape, dtype=grad_out.dtype, device=grad_out.device)
        torch.mm(grad_out, weight.to(grad_out.dtype), out=grad_dropped.view(flat.shape))
        if keep is not None:
            # The mask applied before the cast, in the product's narrower dtype: a product by
            # exactly 0 or 1 rounds nothing, so this is the cast times the mask times scale.
            grad_dropped.view(flat.shape).mul_(keep)
            grad_dropped = grad_dropped.to(flat.dtype).mul_(scale)
        else:
            grad_dropped = grad_dropped.to(flat.dtype)
        grad_x = grad_dropped.to(x.dtype)
    if needs[1]:  # the rebuilt input, as forward made it
        if keep is not None:
            dropped = dropped_as(flat, keep, scale, grad_out.dtype)
        else:
            dropped = flat.to(grad_out.dtype)
        grad_weight = (grad_out.t() @ dropped).to(weight.dtype)
    return grad_x, grad_weight


def draw_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The mask nn.Dropout draws for x (the same `bernoulli_` call on a bool tensor, so the same
    random stream), as 0 / 1 bytes: a float tensor times a uint8 one is one vectorized pass,
    where times a bool one takes torch's per-element casting loop on CPU, 40x slower
    (`bench/mask_product.py`)."""
    keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p)
    return keep.view(torch.uint8)


# Devices where `dropped_as` takes the four passes: a CPU computes a product written in another
# dtype through a temporary in the inputs' dtype, so the two-pass form is no faster there and
# up to 20x slower by dtype and shape (`bench/mask_product.py`); a GPU writes it in one kernel.
FOUR_PASS_DEVICES = frozenset({"cpu"})


def dropped_as(
    x: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """`(x * keep * scale).to(dtype)`, the product nn.Dropout makes in x's dtype cast to the
    matmul's, bit for bit. On a GPU in two passes over the input instead of four (mask to
    float, two products, cast): the product by scale computed in x's dtype and rounded once
    into `dtype`, then the mask as bytes, a product by exactly 0 or 1 that rounds nothing.
    Where x is half and `dtype` another half (fp16 into bf16), the product is rounded to x's
    dtype first, as the cast after it would have."""
    if x.device.type in FOUR_PASS_DEVICES:
        return keep.to(x.dtype).mul_(x).mul_(scale).to(dtype)
    if x.dtype not in (dtype, torch.float32):
        return (x * scale).to(dtype).mul_(keep)
    out = torch.mul(x, scale, out=torch.empty(x.shape, dtype=dtype, device=x.device))
    return out.mul_(keep)


def matmul_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype autocast runs a linear in for x's device, else the adapter's own."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def matmul_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x in the dtype lora_A's matmul takes: autocast's own (it casts), else the weight's."""
    if x.dtype == weight.dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(weight.dtype)


class DropoutLinear(nn.Linear):
    """lora_A with the adapter's dropout inside; the same `weight`, so the same state dict."""

    def __init__(self, linear: nn.Linear, p: float):
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight
        self.p = p
        self._scales: dict[torch.dtype, torch.Tensor] = {}

    def scale(self) -> torch.Tensor:
        """1 / (1 - p) computed as nn.Dropout computes it, in the adapter's dtype, made once (two
        host operations a call saved). It stays a CPU scalar: multiplying a bf16 tensor by it
        is done in fp32 and rounded once, as peft's fp32 product cast to bf16 is, where a scale
        cast to bf16 would already be off in its third digit."""
        dtype = self.weight.dtype
        if dtype not in self._scales:
            self._scales[dtype] = torch.ones((), dtype=dtype, device="cpu") / (1 - self.p)
        return self._scales[dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return F.linear(matmul_input(x, self.weight), self.weight)
        return _DropoutLinear.apply(x, self.weight, self.p, self.scale())


def fuse_lora_dropout(model: nn.Module) -> int:
    """Move each plain LoRA layer's dropout (none counts as p=0) into its lora_A, and switch off
    peft's input cast on layers whose every adapter moved; returns how many moved. Layers with a
    variant (DoRA...) or a bias on lora_A keep peft's path."""
    moved = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            lora_a = module.lora_A[name]
            if (
                type(dropout) not in (nn.Dropout, nn.Identity)
                or type(lora_a) is not nn.Linear
                or lora_a.bias is not None
                or name in getattr(module, "lora_variant", {})
            ):
                continue
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            module.lora_A[name] = DropoutLinear(lora_a, p)
            module.lora_A[name].train(lora_a.training)
            dropouts[name] = nn.Identity()
            moved += 1
        if all(isinstance(a, DropoutLinear) for a in module.lora_A.values()):
            module.cast_input_dtype_enabled = False  # DropoutLinear casts where it must
    return moved
