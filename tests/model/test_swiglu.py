"""The MLP's SwiGLU product as one autograd function: the same losses and gradients bit for
bit (fp32, bf16 autocast, checkpointed, LoRA with dropout), one MLP-wide tensor less kept for
backward, and MLPs it does not know left alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import MistralConfig
from transformers.models.mistral.modeling_mistral import MistralMLP

from helpers import assert_bitwise_equal, packed_test_module
from lorafit.model.swiglu import fuse_swiglu


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
    def run(fused: bool):
        module = packed_test_module(
            checkpointing=True, overrides=("adapter=qlora", "adapter.dropout=0.3")
        ).train()
        mlps = [m for m in module.model.modules() if type(m).__name__ == "MistralMLP"]
        assert len(mlps) == 2 and all(type(m) is not MistralMLP for m in mlps)  # fused
        if not fused:
            for mlp in mlps:
                mlp.__class__ = MistralMLP
        ids = torch.randint(3, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "position_ids": torch.arange(32)[None], "labels": ids}
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, count = module._loss_sum(batch)
        lora = [p for p in module.parameters() if p.requires_grad]
        return loss, torch.autograd.grad(loss, lora)

    loss, grads = run(False)
    fused_loss, fused_grads = run(True)
    assert_bitwise_equal([fused_loss, *fused_grads], [loss, *grads])


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
