"""The MLP's SwiGLU product, `silu(gate) * up`, as one autograd function that keeps only its
two inputs for backward.

transformers' MLP (Llama, Mistral, Qwen2 and their kin) computes `down(silu(gate(x)) * up(x))`.
Autograd keeps `gate` for silu's backward and `silu(gate)` and `up` for the product's: three
MLP-wide tensors a layer, fp32 under peft's recipe (14,336 values a token for Mistral-7B,
448 MiB each at 8192 tokens). They are alive when `down_proj`'s backward runs, the step's
memory peak (docs/benchmarks.md), so the one that can be recomputed for the cost of a silu is:
here backward makes `silu(gate)` again. The gradients are made with the very operators
autograd uses (`silu_backward`, the two products), so losses and gradients are bit for bit the
same (`tests/model/test_swiglu.py`). Backward writes each gradient over the input it is the
last use of, as Liger's SwiGLU kernel does, so that it allocates no MLP-wide tensor where
autograd's path allocated four at the peak. Always on; MLPs whose forward was replaced on the
instance (Liger's SwiGLU) or whose activation is not SiLU keep theirs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation

from lorafit.model.forward_swap import swap_forwards


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):  # noqa: ANN001, ANN205
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        gate, up = ctx.saved_tensors
        if grad.dtype == gate.dtype == up.dtype:
            return _grads_over_inputs(grad, gate, up, ctx.needs_input_grad)
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            # MulBackward's gradient for silu(gate), then SiluBackward's; freed before the
            # activation is remade, so the three are never alive together.
            grad_act = (grad * up).to(gate.dtype)
            grad_gate = torch.ops.aten.silu_backward(grad_act, gate)
            del grad_act
        if ctx.needs_input_grad[1]:
            grad_up = (grad * F.silu(gate)).to(up.dtype)
        return grad_gate, grad_up


def _grads_over_inputs(grad, gate, up, needs):  # noqa: ANN001, ANN202
    """The same gradients, each written over the input it is the last use of: `up` becomes
    silu(gate)'s gradient and then gate's, `gate` becomes silu(gate) and then up's gradient.
    gate and up are the projections' outputs, which nothing but this function keeps (its
    inputs were saved for it alone), so backward allocates no MLP-wide tensor of its own where
    it allocated four, at the step's memory peak. A second backward through the same saved
    tensors finds them modified and autograd refuses it; under checkpointing each backward
    gets freshly recomputed ones."""
    grad_gate = grad_up = None
    if needs[0]:
        grad_act = torch.mul(grad, up, out=up)
        grad_gate = torch.ops.aten.silu_backward.grad_input(grad_act, gate, grad_input=grad_act)
    if needs[1]:
        grad_up = F.silu(gate, inplace=True).mul_(grad)  # grad * silu(gate): the same product
    return grad_gate, grad_up


def _forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # The order of the calls is the original's: gate's LoRA dropout mask is drawn before up's.
    gate = self.gate_proj(x)
    return self.down_proj(_SwiGLU.apply(gate, self.up_proj(x)))


SILU = (nn.SiLU, SiLUActivation)  # what transformers' "silu" and "swish" build


# The one line of the MLPs replaced: any other forward is left as it is.
PLAIN = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"


def fuse_swiglu(model: nn.Module) -> int:
    """Switch each transformers SwiGLU MLP to the same class with `_SwiGLU` for its product
    (same state, same state dict); returns how many."""
    return swap_forwards(
        model, _forward, PLAIN, lambda module: type(getattr(module, "act_fn", None)) in SILU
    )
