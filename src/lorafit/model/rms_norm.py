"""RMSNorm over peft's fp32 stream as one autograd function: autograd's gradients, bit for bit,
in fewer passes.

transformers' RMSNorm (Llama, Mistral, Qwen2 and their kin) computes
`weight * (x * rsqrt(mean(x**2) + eps))`. Over a 4-bit base peft keeps x and the weight in
fp32, and autograd's backward makes the gradient of `mean(x**2)` as a row-wide tensor divided
by the width, a copy of x (`x.pow(1)`), that copy doubled, and their product: four passes
over the hidden size where one does, twice a layer; a fifth of the norms' memory traffic a
step (`python bench/step_ops.py --traffic`: 80 GB to 65 at 2048 tokens).

Here the forward makes the same operators, and backward the same products in the same order,
except that the per-row factor is divided and doubled before it meets x: dividing by the width
is dividing each element of an expanded row by the same number, and doubling is exact, so
`x * (grad / width * 2)` is autograd's `(grad.expand(...) / width) * (2 * x)` to the bit. x
enters twice, so that its two gradients (through the product and through the square) reach
autograd as two contributions, summed with the residual's in autograd's order
(`tests/model/test_rms_norm.py`). Frozen fp32 weights only (the norms under LoRA over a
quantized base); any other dtype, a trained weight, no gradient or torch.compile takes the
original forward.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.model.forward_swap import swap_forwards


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_again, weight, eps):  # noqa: ANN001, ANN205
        variance = x.pow(2).mean(-1, keepdim=True)
        rstd = torch.rsqrt(variance + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x * rstd)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, weight, rstd = ctx.saved_tensors
        grad_h = grad * weight
        # x * rstd: x's gradient first, as MulBackward returns it, then rstd's, summed to its
        # shape; rsqrt's backward as autograd's formula writes it.
        grad_x = grad_h * rstd
        grad_rstd = (grad_h * x).sum(-1, keepdim=True)
        del grad_h
        grad_variance = grad_rstd * -0.5 * rstd.pow(3)
        # mean's backward divides the expanded row by its width, pow's multiplies by 2 * x.
        grad_square = x * (grad_variance / x.shape[-1] * 2)
        return grad_x, grad_square, None, None


def _forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if (
        hidden_states.dtype != torch.float32
        or weight.dtype != torch.float32
        or weight.requires_grad
        or not torch.is_grad_enabled()
        # Compiled (`model.compile`), the norm is the compiler's to fuse; and torch 2.11's
        # dropped one of x's two gradients here (tests/model/test_compiled_layers.py).
        or torch.compiler.is_compiling()
    ):
        return type(self).__mro__[1].forward(self, hidden_states)
    return _RMSNorm.apply(hidden_states, hidden_states, weight, self.variance_epsilon)


# The lines of the norms replaced: any other forward is left as it is.
PLAIN = """        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)"""


def fuse_rms_norm(model: nn.Module) -> int:
    """Switch each transformers RMSNorm to the same class with `_RMSNorm` for its fp32 training
    forward (same state, same state dict); returns how many."""
    return swap_forwards(model, _forward, PLAIN)
