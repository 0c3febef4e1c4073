"""LoRA dropout that keeps a one-byte mask for backward instead of a dropped copy of the input.

peft computes `lora_B(lora_A(dropout(x)))`: autograd then keeps, for every adapted layer, the
dropped input (4 bytes a value in fp32) for lora_A's weight gradient, besides dropout's own
mask, although `x` itself is already kept by the layers around it. For SmolLM2-135M on a
512-token row that is about 300 MB of a step's 1.1 GB of saved activations. Here dropout and
lora_A are one autograd function that keeps the mask as bytes and `x` (shared, no copy), from
which backward remakes the dropped input; or, where the dropped input is narrower than `x`
(bf16 under autocast from peft's fp32 stream), that input itself (`kept_input`).

The mask is drawn with the call `nn.Dropout` makes on a CPU (`bernoulli_(1 - p)`, over a tensor
shaped like `x`), so there the random stream, the masks and therefore the losses are those of
peft's own path: same seed, same numbers (`tests/model/test_lora_dropout.py`). On a GPU
`nn.Dropout` draws inside its own fused kernel, which hands the random numbers to elements in
another order: the masks have the same law (each value kept with probability 1 - p, alone) but
are not peft's, so a GPU run and peft's differ by their masks; given the same masks they compute
the same numbers (`tests/model/test_lora_branch.py`, on CUDA).

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
    def forward(ctx, x, weight, p, scale, zero):  # noqa: ANN001, ANN205
        # The mask nn.Dropout draws: the same bernoulli_ call on the same random stream, here
        # into one byte a value. `scale` is its 1 / (1 - p) (see `DropoutLinear.scale`).
        keep = draw_mask(x, p)
        compute = matmul_input(x, weight)
        # Dropped straight into the dtype the matmul takes (autocast's cast made here).
        dropped = dropped_as(compute, keep, scale, matmul_dtype(x, weight), zero)
        out = F.linear(dropped, weight)
        ctx.save_for_backward(kept_input(x, dropped), weight, keep, zero)
        ctx.scale = scale
        ctx.x = InputMeta(x, compute.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        saved, weight, keep, zero = ctx.saved_tensors
        grad_out = grad_out.reshape(-1, grad_out.shape[-1])  # the matmul's: bf16 under autocast
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = input_grad(grad_out, weight, keep, ctx.scale, ctx.x, zero)
        if ctx.needs_input_grad[1]:
            dropped = lora_a_input(saved, keep, ctx.scale, ctx.x, grad_out.dtype, zero)
            grad_weight = (grad_out.t() @ dropped).to(weight.dtype)
        return grad_x, grad_weight, None, None, None


class InputMeta:
    """What backward needs of lora_A's input x besides the tensor kept: its shape and dtype,
    and `compute`, the dtype its dropout product is made in (x's, or the weight's where no
    autocast casts)."""

    __slots__ = ("shape", "dtype", "compute")

    def __init__(self, x: torch.Tensor, compute: torch.dtype):
        self.shape, self.dtype, self.compute = x.shape, x.dtype, compute


def kept_input(x: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """What backward keeps to make lora_A's weight gradient: the dropped input as forward made
    it where it is narrower than x (bf16 made from peft's fp32 stream), which then needs no
    pass to remake it and frees x where no other layer keeps it (down_proj's MLP-wide input);
    else x itself, which the layers reading the same input share (q, k and v: one copy)."""
    return dropped if dropped.dtype.itemsize < x.dtype.itemsize else x


def lora_a_input(
    saved: torch.Tensor,
    keep: torch.Tensor | None,
    scale: float,
    x: InputMeta,
    dtype: torch.dtype,
    zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """lora_A's input as forward made it, folded to 2-d: kept (`kept_input`), or remade from x
    the same way. Backward runs outside autocast, and remaking a bf16 input in the weight's
    fp32 (three MLP-wide copies) was once the step's memory peak."""
    if saved.dtype.itemsize < x.dtype.itemsize:  # kept_input's choice: the dropped input
        return saved.reshape(-1, saved.shape[-1])
    flat = saved.to(x.compute).reshape(-1, saved.shape[-1])
    if keep is None:
        return flat.to(dtype)
    return dropped_as(flat, keep.view(flat.shape), scale, dtype, zero)


def input_grad(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor | None,
    scale: float,
    x: InputMeta,
    zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """x's gradient for `linear(x * keep * scale, weight)` (keep None: no dropout), given the
    output's gradient folded to 2-d, with autograd's own products; with `zero` (see
    `mixed_addcmul`) in one pass on a GPU. It is made in x's shape rather than viewed into it:
    where x has another consumer (the base layer), autograd adds the other gradient in place
    into a tensor it alone holds, but into a view it allocates the sum anew (for down_proj an
    MLP-wide fp32 tensor)."""
    grad = torch.empty(x.shape, dtype=grad_out.dtype, device=grad_out.device)
    torch.mm(grad_out, weight.to(grad_out.dtype), out=grad.view(-1, x.shape[-1]))
    if keep is None:
        return grad.to(x.compute).to(x.dtype)
    keep = keep.view(x.shape)
    if zero is not None and x.compute == torch.float32 and one_pass(grad.device):
        # The mask, the widening and the scale in one pass (see `dropped_as`).
        return mixed_addcmul(zero, grad, keep, scale, torch.float32).to(x.dtype)
    # The mask applied before the cast, in the product's narrower dtype: a product by exactly
    # 0 or 1 rounds nothing, so this is the cast times the mask times scale.
    return grad.mul_(keep).to(x.compute).mul_(scale).to(x.dtype)


def draw_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The mask nn.Dropout draws for x on a CPU (the same `bernoulli_` call, which draws one
    number an element in order whatever the tensor's dtype: the same random stream), as 0 / 1
    bytes: a float tensor times a uint8 one is one vectorized pass, where times a bool one takes
    torch's per-element casting loop on CPU, 40x slower (`bench/mask_product.py`). Drawn as
    uint8, not as bool viewed as uint8: torch 2.11's compiler cannot lower that view (on any
    device), and `model.compile` failed on a GPU there (`tests/model/test_compiled_layers.py`)."""
    if torch.compiler.is_compiling() and x.device in _DRAW_ORDER:
        return _ordered_mask(x, p, _DRAW_ORDER[x.device])
    return _mask(x, p)


def _mask(x: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.uint8, device=x.device).bernoulli_(1 - p)


# Compiled code draws each mask where eager code does, in the same order: a compiled graph
# holding several dropouts (a whole decoder layer, or an MLP's three projections) may otherwise
# schedule their draws in another order, handing one projection's random numbers to another
# (and recomputation then draws other masks than the forward did). Each draw inside compiled
# code is one call of `lorafit::ordered_mask`, which writes a one-value tensor per device that
# every draw shares: the compiler keeps writes to one tensor in program order. Eager code draws
# as before (`_mask`).
_DRAW_ORDER: dict[torch.device, torch.Tensor] = {}


def order_compiled_draws(device: torch.device) -> None:
    """Before compiling a model on `device`: its compiled dropout masks drawn in eager order."""
    device = torch.device(device)
    if device not in _DRAW_ORDER:
        _DRAW_ORDER[device] = torch.zeros(1, dtype=torch.uint8, device=device)


# Defined with torch.library's plain registration rather than `torch.library.custom_op`, whose
# Python wrappers (autograd, in-place bookkeeping, default arguments) run at every call, from
# compiled code too: host time, 448 calls a step for the canonical job compiled. The mask is
# bytes, which autograd never differentiates, so the op needs no autograd kernel.
_LIBRARY = torch.library.Library("lorafit", "DEF")
_LIBRARY.define("ordered_mask(Tensor x, float p, Tensor(a!) order) -> Tensor")


def _ordered_mask_kernel(x: torch.Tensor, p: float, order: torch.Tensor) -> torch.Tensor:
    return _mask(x, p)


_LIBRARY.impl("ordered_mask", _ordered_mask_kernel, "CompositeExplicitAutograd")


@torch.library.register_fake("lorafit::ordered_mask")
def _(x: torch.Tensor, p: float, order: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.uint8, device=x.device)


_ordered_mask = torch.ops.lorafit.ordered_mask.default


# Devices that take the CPU's forms of the operations below. A GPU kernel casts its operands
# as it reads them and its result as it writes it, so a product of an fp32 tensor and a byte
# mask written in bf16 is one pass; a CPU makes such an operation through temporaries in the
# computing dtype, of the inputs' size, so there these forms are no faster and use more memory
# (up to 20x slower by dtype and shape: `bench/mask_product.py`).
CPU_FORM_DEVICES = frozenset({"cpu"})


def one_pass(device: torch.device) -> bool:
    """Whether mixed-dtype operations on `device` take their one-pass (GPU) form: not while
    torch.compile traces them, as its compiler fuses the casts and products of the other forms
    itself, and torch 2.11's made zero input gradients of the branch through these forms
    (`tests/model/test_compiled_layers.py`)."""
    return device.type not in CPU_FORM_DEVICES and not torch.compiler.is_compiling()


def mixed_addcmul(
    start: torch.Tensor,
    tensor1: torch.Tensor,
    tensor2: torch.Tensor,
    value: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """`start + value * tensor1 * tensor2` written in `dtype`, in one pass whatever the
    operands' dtypes (bf16, a uint8 mask): with one operand an fp32 one-element tensor (-0.0
    or 1.0, `DropoutLinear.zero` / `one`) the computing dtype is fp32. Multiplying by 1.0 and
    adding -0.0 change no bit (-0.0 + y is y, signed zeros included). tensor1 has the result's
    shape (`torch.broadcast_shapes` would cost the host tens of microseconds a call)."""
    out = torch.empty(tensor1.shape, dtype=dtype, device=tensor1.device)
    return torch.addcmul(start, tensor1, tensor2, value=value, out=out)


def dropped_as(
    x: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
    dtype: torch.dtype,
    zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(x * keep * scale).to(dtype)`, the product nn.Dropout makes in x's dtype cast to the
    matmul's, bit for bit. On a GPU from fp32 given `zero` (see `mixed_addcmul`), in one pass
    over the input instead of four (mask to float, two products, cast): the product by scale
    in fp32 times the mask as bytes, rounded once into `dtype` (a product by exactly 0 or 1
    rounds nothing). Else in two: the product rounded into `dtype`, then the mask; where x is
    half and `dtype` another half (fp16 into bf16), the product is rounded to x's dtype first,
    as the cast after it would have."""
    if not one_pass(x.device):
        return keep.to(x.dtype).mul_(x).mul_(scale).to(dtype)
    if x.dtype == torch.float32 and zero is not None:
        return mixed_addcmul(zero, x, keep, scale, dtype)
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
        self._scales: dict[torch.dtype, float] = {}
        self.scale()
        # -0.0 and 1.0 as fp32 one-element tensors on the weight's device, moving with it: the
        # operands that make the one-pass forms compute in fp32 (`mixed_addcmul`). Buffers,
        # so that a compiler finds them made; not state, so out of the state dict.
        self.register_buffer("zero", self._constant(-0.0, linear.weight), persistent=False)
        self.register_buffer("one", self._constant(1.0, linear.weight), persistent=False)

    @staticmethod
    def _constant(value: float, like: torch.Tensor) -> torch.Tensor:
        return torch.full((1,), value, dtype=torch.float32, device=like.device)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        # A cast of the module (`.half()`, bf16-true precision) casts floating buffers too, and
        # `to_empty` leaves them unset: the two are made again where they now are.
        super()._apply(fn, recurse)
        self.zero, self.one = self._constant(-0.0, self.zero), self._constant(1.0, self.one)
        return self

    def scale(self) -> float:
        """1 / (1 - p) computed as nn.Dropout computes it, in the adapter's dtype, made once (two
        host operations a call saved), for the weight's dtype at creation before any compiler
        traces a call. A Python number: multiplying a bf16 tensor by it is done in fp32 and
        rounded once, as peft's fp32 product cast to bf16 is, where a scale cast to bf16 would
        already be off in its third digit."""
        dtype = self.weight.dtype
        if dtype not in self._scales:
            self._scales[dtype] = (torch.ones((), dtype=dtype, device="cpu") / (1 - self.p)).item()
        return self._scales[dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return F.linear(matmul_input(x, self.weight), self.weight)
        return _DropoutLinear.apply(x, self.weight, self.p, self.scale(), self.zero)


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
