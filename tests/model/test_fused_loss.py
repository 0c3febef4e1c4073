"""The fused output layer + cross entropy equals the plain path: loss, token count and
gradients, in fp32 and under bf16 autocast, on its own and inside the LightningModule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import packed_demo, packed_test_module
from lorafit.constants import IGNORE_INDEX
from lorafit.data.batching import pad_collate
from lorafit.model.fused_loss import linear_cross_entropy_sum
from lorafit.model.losses import token_loss_sum


def _case(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 17, 8, generator=generator, dtype=dtype)
    weight = torch.randn(50, 8, generator=generator, dtype=dtype)
    labels = torch.randint(0, 50, (3, 17), generator=generator)
    labels[0, :6] = IGNORE_INDEX  # a prompt
    labels[2, 12:] = IGNORE_INDEX  # padding
    return hidden.requires_grad_(), weight.requires_grad_(), labels


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_loss_count_and_gradients_equal_the_plain_path(chunk):
    hidden, weight, labels = _case(torch.float64)
    plain, plain_count = token_loss_sum(F.linear(hidden, weight), labels)
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    fused, count = linear_cross_entropy_sum(hidden, weight, labels, chunk)
    grads = torch.autograd.grad(fused, (hidden, weight))
    assert count == plain_count == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(fused, plain.float(), rtol=1e-6, atol=1e-6)
    for grad, expected in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    # Positions with no label get no gradient at all.
    assert grads[0][0, :5].abs().sum() == 0


def test_a_frozen_output_layer_gets_no_gradient_and_a_scaled_loss_scales_it():
    hidden, weight, labels = _case()
    weight.requires_grad_(False)
    fused, _ = linear_cross_entropy_sum(hidden, weight, labels, 4)
    (grad,) = torch.autograd.grad(3.0 * fused, hidden)
    plain, _ = token_loss_sum(F.linear(hidden, weight), labels)
    (expected,) = torch.autograd.grad(3.0 * plain, hidden)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_nothing_labelled_is_a_zero_loss_that_still_backpropagates():
    hidden, weight, labels = _case()
    labels[:] = IGNORE_INDEX
    loss, count = linear_cross_entropy_sum(hidden, weight, labels)
    loss.backward()
    assert count == 0 and loss.item() == 0.0 and hidden.grad.abs().sum() == 0


def test_under_bf16_autocast_it_matches_the_plain_path_to_bf16_precision():
    hidden, weight, labels = _case(seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _ = token_loss_sum(F.linear(hidden, weight), labels)
        fused, _ = linear_cross_entropy_sum(hidden, weight, labels, 5)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=2e-2, atol=2e-2)
    plain_grad, fused_grad = (torch.autograd.grad(x, hidden)[0] for x in (plain, fused))
    torch.testing.assert_close(fused_grad, plain_grad, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("packed", [True, False])
def test_the_module_trains_on_the_same_loss_and_lora_gradients(demo_examples, packed):
    if packed:
        dataset, collate = packed_demo(demo_examples)
        batch = collate([dataset[i] for i in range(2)])
    else:
        items = [{**demo_examples.example(i), "step_tokens": 0} for i in range(3)]
        batch = pad_collate(items, pad_token_id=0)
    results = []
    for chunk in (None, 64):
        module = packed_test_module(overrides=(f"model.loss_chunk_size={chunk or 'null'}",))
        loss, count = module._loss_sum(batch)
        lora = [p for p in module.parameters() if p.requires_grad]
        results.append((loss, count, torch.autograd.grad(loss, lora)))
    (plain, plain_count, plain_grads), (fused, count, grads) = results
    assert count == plain_count
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    for grad, expected in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
