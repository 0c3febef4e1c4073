"""The training step's own kernels under another default device. On a GPU, Lightning makes CUDA
torch's default device while the model runs; a tensor made without the input's device then
lands there (the first GPU run failed on such a generator). Here a meta default device around
CPU inputs: any tensor made without an explicit device fails or comes out wrong."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lorafit.constants import IGNORE_INDEX
from lorafit.model.fused_loss import linear_cross_entropy_sum
from lorafit.model.lora_dropout import fuse_lora_dropout
from lorafit.model.packed_attention import packed_sdpa_attention


def _twice(compute):
    """The same computation outside and inside a meta default-device context, same seed."""
    results = []
    for context in (torch.device("cpu"), torch.device("meta")):
        torch.manual_seed(3)
        with context:
            results.append(compute())
    return results


def test_the_fused_loss_makes_its_tensors_where_its_inputs_are():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 8, generator=g).requires_grad_()
    weight = torch.randn(40, 8, generator=g).requires_grad_()
    labels = torch.randint(0, 40, (2, 9), generator=g)
    labels[0, :3] = IGNORE_INDEX

    def compute():
        loss, _ = linear_cross_entropy_sum(hidden, weight, labels, 5)
        return (loss, *torch.autograd.grad(loss, (hidden, weight)))

    outside, inside = _twice(compute)
    for a, b in zip(outside, inside, strict=True):
        assert b.device.type == "cpu"
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_the_fused_lora_dropout_draws_its_mask_where_the_input_is():
    torch.manual_seed(0)
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False)),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["0"]),
    ).train()
    assert fuse_lora_dropout(model) == 1
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    x = torch.randn(4, 8).bfloat16().requires_grad_()

    def compute():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x).float().sum()
        return (
            out,
            *torch.autograd.grad(out, [x, *(p for p in model.parameters() if p.requires_grad)]),
        )

    outside, inside = _twice(compute)
    for a, b in zip(outside, inside, strict=True):
        assert b.device.type == "cpu"
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("window", [None, 3])
def test_packed_attention_finds_its_spans_where_the_positions_are(window):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 12, 8, generator=g).requires_grad_()
    k, v = (torch.randn(1, 2, 12, 8, generator=g) for _ in range(2))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1, 2]])

    def compute():
        # A new position-ids tensor each time: the spans are found again, inside the context.
        out, _ = packed_sdpa_attention(
            None, q, k, v, None, position_ids=position_ids.clone(), sliding_window=window
        )
        return out, *torch.autograd.grad(out.sum(), q)

    outside, inside = _twice(compute)
    for a, b in zip(outside, inside, strict=True):
        assert b.device.type == "cpu"
        torch.testing.assert_close(b, a, rtol=0, atol=0)
