"""The LoRA branch of 4-bit layers as one autograd function gives peft's losses and gradients
bit for bit (fp32, bf16 autocast, fp32 or bf16 activations, with and without dropout, under
checkpointing), dispatches fewer operators, and leaves other states to peft's forward."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from helpers import CountOps, four_bit_linear
from lorafit.model.lora_branch import FusedBranchLinear4bit, fuse_lora_branches
from lorafit.model.lora_dropout import fuse_lora_dropout


class Tiny(nn.Module):
    is_loaded_in_4bit = True  # what peft reads to wrap bitsandbytes' layers

    def __init__(self, checkpointed: bool = False, device: str = "cpu"):
        super().__init__()
        self.up = four_bit_linear(64, 128, device)
        self.down = four_bit_linear(128, 64, device)
        self.checkpointed = checkpointed

    def block(self, x):
        return self.down(torch.relu(self.up(x)))

    def forward(self, x):
        return (
            checkpoint(self.block, x, use_reentrant=False) if self.checkpointed else self.block(x)
        )


def _model(p: float, fused: bool, checkpointed: bool = False, device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(
        Tiny(checkpointed, device),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=p, target_modules=["up", "down"]),
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts lora_B at zero: no gradient would reach lora_A
            nn.init.normal_(param, std=0.1)
    if fused:
        fuse_lora_dropout(model)
        assert fuse_lora_branches(model) == 2
    return model.to(device).train()


def _run(model, x, seed):
    torch.manual_seed(seed)
    loss = model(x).float().square().sum()
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, [x, *lora])


def _compare(autocast, activations, p, checkpointed, device="cpu"):
    peft_model = _model(p, False, checkpointed, device)
    fused = _model(p, True, checkpointed, device)
    x = torch.randn(2, 7, 64, dtype=activations, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        for seed in (1, 2):
            loss, grads = _run(peft_model, x, seed)
            fused_loss, fused_grads = _run(fused, x, seed)
            assert torch.equal(fused_loss, loss)
            for grad, expected in zip(fused_grads, grads, strict=True):
                assert grad.dtype == expected.dtype
                assert torch.equal(grad, expected)
    if p:  # other seeds draw other masks: dropout applies
        assert not torch.equal(_run(fused, x, 1)[0], _run(fused, x, 2)[0])


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize(
    ("autocast", "activations"),
    [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)],
)
def test_the_branch_gives_peft_s_losses_and_gradients(autocast, activations, p, checkpointed):
    _compare(autocast, activations, p, checkpointed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("activations", [torch.float32, torch.bfloat16])
def test_on_a_gpu_the_branch_gives_peft_s_losses_and_gradients(activations):
    # cuBLAS and bitsandbytes' CUDA kernels, CUDA's random stream, under bf16 autocast.
    _compare(True, activations, 0.3, True, "cuda")


def test_the_branch_dispatches_fewer_operators():
    """Against peft's layer with the dropout already fused into lora_A, the path before."""
    x = torch.randn(2, 7, 64, requires_grad=True)
    before = _model(0.3, False)
    fuse_lora_dropout(before)
    counts = []
    for model in (before, _model(0.3, True)):
        _run(model, x, 0)  # the dropout scales are made once
        with torch.autocast("cpu", dtype=torch.bfloat16), CountOps() as count:
            _run(model, x, 1)
        counts.append(count.n)
    assert counts[1] <= 0.9 * counts[0], counts


def test_other_states_take_peft_s_forward():
    model = _model(0.3, True)
    layer = model.base_model.model.up
    assert type(layer) is FusedBranchLinear4bit
    assert model.state_dict().keys() == _model(0.3, False).state_dict().keys()
    x = torch.randn(2, 7, 64)
    # eval: no dropout, no graph: peft's own forward, same output as the unfused model's
    expected = _model(0.3, False).eval().base_model.model.up(x)
    assert torch.equal(layer.eval()(x), expected)
    with model.disable_adapter():
        assert torch.equal(layer.train()(x), layer.base_layer(x))
