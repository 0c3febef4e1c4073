"""RMSNorm over an fp32 stream as one autograd function: the same losses and gradients bit for
bit (fp32, bf16 autocast, checkpointed, in a residual block and a whole QLoRA model), fewer
bytes moved in backward, and other norms and states left to transformers' forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.mistral.modeling_mistral import MistralRMSNorm

from helpers import MovedBytes, assert_bitwise_equal, tiny_qlora_grads
from lorafit.model.rms_norm import _RMSNorm, fuse_rms_norm


class Block(nn.Module):
    """x + proj(norm(x)): the residual adds its gradient to x's two from inside the norm."""

    def __init__(self, checkpointed: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.norm = MistralRMSNorm(64, eps=1e-5)
        self.proj = nn.Linear(64, 64)
        with torch.no_grad():
            self.norm.weight.copy_(torch.randn(64))
        self.norm.weight.requires_grad_(False)  # frozen, as under LoRA
        self.checkpointed = checkpointed

    def forward(self, x):
        inner = lambda x: x + self.proj(self.norm(x))  # noqa: E731
        return checkpoint(inner, x, use_reentrant=False) if self.checkpointed else inner(x)


def _grads(block, x, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = block(block(x)).float().square().sum()
    return [loss, *torch.autograd.grad(loss, [x, block.proj.weight])]


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_the_fused_norm_gives_the_same_loss_and_gradients(autocast, checkpointed):
    plain, fused = Block(checkpointed), Block(checkpointed)
    assert fuse_rms_norm(fused) == 1
    assert fused.state_dict().keys() == plain.state_dict().keys()
    # Values over six orders of magnitude: the sums round differently in another order.
    x = (torch.randn(3, 50, 64) * torch.logspace(-3, 3, 64)).requires_grad_()
    assert_bitwise_equal(_grads(fused, x, autocast), _grads(plain, x, autocast))


def test_x_s_two_gradients_reach_autograd_apart(monkeypatch):
    """Summed inside the function, x's two gradients would meet the residual's in another
    order than autograd's and round otherwise."""
    fused = Block()
    fuse_rms_norm(fused)
    x = (torch.randn(3, 50, 64) * torch.logspace(-3, 3, 64)).requires_grad_()
    expected = _grads(Block(), x, False)[1]
    backward = _RMSNorm.backward

    def summed(ctx, grad):
        grad_x, grad_square, *rest = backward(ctx, grad)
        return grad_x + grad_square, None, *rest

    monkeypatch.setattr(_RMSNorm, "backward", staticmethod(summed))
    assert not torch.equal(_grads(fused, x, False)[1], expected)


def test_backward_moves_fewer_bytes():
    x = torch.randn(2, 40, 64, requires_grad=True)
    moved = []
    for fused in (False, True):
        norm = Block().norm
        if fused:
            fuse_rms_norm(norm)
        out = norm(x)
        with MovedBytes() as count:
            torch.autograd.grad(out, [x], torch.ones_like(out))
        moved.append(count.n)
    # 61 bytes a value against 89: mean's and pow's backward in one pass instead of four.
    assert moved[1] <= 0.75 * moved[0], moved


def test_other_dtypes_trained_weights_and_no_grad_take_transformers_forward():
    norm = Block().norm
    fuse_rms_norm(norm)
    x = torch.randn(2, 5, 64, requires_grad=True)
    assert "_RMSNorm" in type(norm(x).grad_fn).__name__
    assert "_RMSNorm" not in type(norm(x.bfloat16()).grad_fn).__name__
    with torch.no_grad():
        assert torch.equal(norm(x), MistralRMSNorm.forward(norm, x))
    norm.weight.requires_grad_(True)
    assert "_RMSNorm" not in type(norm(x).grad_fn).__name__


def test_norms_it_does_not_know_are_left_alone():
    liger_like = MistralRMSNorm(8)
    liger_like.forward = lambda x: x  # a forward replaced on the instance

    class OtherNorm(MistralRMSNorm):  # another forward over the same weight
        def forward(self, x):
            return self.weight * x

    other = MistralRMSNorm(8)
    other.__class__ = OtherNorm
    OtherNorm.__module__ = MistralRMSNorm.__module__
    assert fuse_rms_norm(nn.ModuleList([liger_like, other, nn.LayerNorm(8)])) == 0
    assert type(liger_like) is MistralRMSNorm and type(other) is OtherNorm


def test_the_qlora_model_trains_the_same_with_and_without_it():
    # peft's fp32 stream over a 4-bit base, checkpointed layers, bf16 autocast, dropout
    assert_bitwise_equal(tiny_qlora_grads(), tiny_qlora_grads(unfused=(MistralRMSNorm, 5)))
