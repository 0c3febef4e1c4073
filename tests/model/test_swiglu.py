"""The MLP's SwiGLU product as one autograd function: the same losses and gradients bit for
bit (fp32, bf16 autocast, checkpointed, LoRA with dropout), one MLP-wide tensor less kept for
backward, and MLPs it does not know left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint
from transformers import MistralConfig
from transformers.models.mistral.modeling_mistral import MistralMLP

from helpers import assert_bitwise_equal, tiny_qlora_grads
from lorafit.model.swiglu import _SwiGLU, fuse_swiglu


def _mlp(dtype=torch.float32) -> MistralMLP:
    torch.manual_seed(0)
    config = MistralConfig(hidden_size=32, intermediate_size=96, hidden_act="silu")
    return MistralMLP(config).to(dtype)


def _grads(mlp, x, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = mlp(x).float().square().sum()
    return loss, torch.autograd.grad(loss, [x, *mlp.parameters()])


@pytest.mark.parametrize(
    ("autocast", "dtype"),
    [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)],
)
def test_the_fused_product_gives_the_same_loss_and_gradients(autocast, dtype):
    plain, fused = _mlp(dtype), _mlp(dtype)
    assert fuse_swiglu(fused) == 1
    assert fused.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 5, 32, dtype=dtype, requires_grad=True)
    loss, grads = _grads(plain, x, autocast)
    fused_loss, fused_grads = _grads(fused, x, autocast)
    assert_bitwise_equal([fused_loss, *fused_grads], [loss, *grads])


def _kept_values(mlp, x) -> int:
    """Values of the tensors autograd keeps for backward (weights left out)."""
    weights = {p.data_ptr() for p in mlp.parameters()}
    kept = []

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            kept.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mlp(x)
    return sum(kept)


def test_one_mlp_wide_tensor_less_is_kept_for_backward():
    plain, fused = _mlp(), _mlp()
    fuse_swiglu(fused)
    x = torch.randn(2, 5, 32, requires_grad=True)
    assert _kept_values(plain, x) - _kept_values(fused, x) == 2 * 5 * 96  # silu(gate)


def test_the_lora_model_trains_the_same_with_and_without_it():
    # peft's LoRA layers inside the MLP (dropout on), checkpointed layers, bf16 autocast
    assert_bitwise_equal(tiny_qlora_grads(), tiny_qlora_grads(unfused=(MistralMLP, 2)))


def test_mlps_it_does_not_know_are_left_alone():
    gelu = _mlp()
    gelu.act_fn = nn.GELU()
    liger_like = _mlp()
    liger_like.forward = lambda x: x  # a forward replaced on the instance

    class OtherMLP(MistralMLP):  # another forward over the same layers
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    other = _mlp()
    other.__class__ = OtherMLP
    OtherMLP.__module__ = MistralMLP.__module__
    assert fuse_swiglu(nn.ModuleList([gelu, liger_like, other])) == 0
    assert type(gelu) is MistralMLP and type(liger_like) is MistralMLP
    assert type(other) is OtherMLP


class _NewStorages(TorchDispatchMode):
    """Counts the operator outputs of `numel` values that are not in a storage given."""

    def __init__(self, numel: int, known: list[torch.Tensor]):
        super().__init__()
        self.numel, self.new = numel, 0
        self.known = {t.untyped_storage().data_ptr() for t in known}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() == self.numel:
                self.new += t.untyped_storage().data_ptr() not in self.known
        return out


def _gate_and_up(dtypes=(torch.float32, torch.float32)):
    torch.manual_seed(0)
    x = torch.randn(6, 16, requires_grad=True)
    weights = [torch.randn(24, 16, requires_grad=True) for _ in range(2)]
    # As in the MLP: the projections' outputs, which nothing else keeps.
    return x, weights, [(x @ w.t()).to(d) for w, d in zip(weights, dtypes, strict=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_writes_its_gradients_over_its_inputs(dtype):
    x, weights, (gate, up) = _gate_and_up((dtype, dtype))
    out = _SwiGLU.apply(gate, up)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(F.silu(gate) * up, [gate, up], grad, retain_graph=True)
    with _NewStorages(gate.numel(), [gate, up, grad]) as seen:
        got = torch.autograd.grad(out, [gate, up], grad)
    assert_bitwise_equal(list(got), list(expected))
    assert seen.new == 0  # four MLP-wide tensors before


def test_inputs_of_two_dtypes_get_their_gradients_in_new_tensors():
    x, weights, (gate, up) = _gate_and_up((torch.float32, torch.bfloat16))
    out = _SwiGLU.apply(gate, up)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(F.silu(gate) * up, [gate, up], grad, retain_graph=True)
    assert_bitwise_equal(list(torch.autograd.grad(out, [gate, up], grad)), list(expected))


def test_a_second_backward_over_overwritten_inputs_is_refused():
    x, weights, (gate, up) = _gate_and_up()
    loss = _SwiGLU.apply(gate, up).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_checkpointed_a_second_backward_recomputes_and_agrees():
    x, weights, _ = _gate_and_up()

    def block(x):
        return _SwiGLU.apply(x @ weights[0].t(), x @ weights[1].t())

    loss = checkpoint(block, x, use_reentrant=False).square().sum()
    first = torch.autograd.grad(loss, [x, *weights], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *weights])
    assert_bitwise_equal(list(second), list(first))
