"""Packing: no example split or lost, positions restart, and packed rows give exactly the
losses, logits and gradients of their examples run one by one."""

from __future__ import annotations

import math
import random

import pytest
import torch

from helpers import TINY, compose_config, logged, packed_test_module
from lorafit.config_checks import check_config
from lorafit.constants import IGNORE_INDEX
from lorafit.data.examples import PackedExamples
from lorafit.data.packing import pack_row, pack_rows, packed_collate
from lorafit.errors import PackingError
from lorafit.model.losses import token_loss_sum
from lorafit.training import train


@pytest.mark.parametrize(("capacity", "longest"), [(64, 64), (512, 128), (2048, 600)])
def test_best_fit_never_splits_or_loses_an_example(capacity, longest):
    rng = random.Random(capacity)
    lengths = [rng.randint(1, longest) for _ in range(3000)]
    rows = pack_rows(lengths, capacity)
    members = sorted(i for row in rows for i in row)
    assert members == list(range(len(lengths)))  # each example exactly once: none split
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    if longest <= capacity // 4:  # examples short against the row, as instruction data is
        assert len(rows) <= math.ceil(sum(lengths) / capacity) + 1


def test_an_example_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="longer than the row capacity"):
        pack_rows([5, 11], 10)


def test_packed_row_restarts_positions_and_masks_each_first_label():
    a = {"input_ids": [1, 10, 11], "labels": [1, 10, 11]}
    b = {"input_ids": [1, 20], "labels": [1, 20]}
    row = pack_row([a, b])
    assert row["input_ids"] == [1, 10, 11, 1, 20]
    assert row["position_ids"] == [0, 1, 2, 0, 1]
    assert row["labels"] == [IGNORE_INDEX, 10, 11, IGNORE_INDEX, 20]
    batch = packed_collate([{**row, "step_tokens": 0}], pad_token_id=0, pad_to=8)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["labels"][0, 5:].tolist() == [IGNORE_INDEX] * 3
    assert int(batch["real_tokens"]) == 5 and "attention_mask" not in batch


def test_packed_rows_conserve_every_token(demo_examples):
    packed = PackedExamples(demo_examples, pack_rows(demo_examples.lengths().tolist(), 256))
    rows = [packed[i] for i in range(len(packed))]
    assert sum(len(r["input_ids"]) for r in rows) == len(demo_examples.input_ids)
    assert sorted(t for r in rows for t in r["input_ids"]) == sorted(demo_examples.input_ids)
    assert len(packed) < len(demo_examples)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "sdpa_packed", "eager"])
def test_packed_loss_and_logits_equal_examples_run_alone(demo_examples, attn, checkpointing, mode):
    module = packed_test_module(attn, checkpointing).train(mode == "train")
    packed = PackedExamples(demo_examples, pack_rows(demo_examples.lengths().tolist(), 256))
    row = next(i for i, r in enumerate(packed.rows) if len(r) >= 3)
    batch = packed_collate([packed[row]], pad_token_id=0, pad_to=256)
    with torch.set_grad_enabled(mode == "train"):
        logits = module(batch["input_ids"], position_ids=batch["position_ids"])
        packed_loss, packed_count = token_loss_sum(logits, batch["labels"])
        total, count, start = 0.0, 0, 0
        for member in packed.rows[row]:
            alone = demo_examples.example(member)
            ids, labels = torch.tensor([alone["input_ids"]]), torch.tensor([alone["labels"]])
            single = module(ids, attention_mask=torch.ones_like(ids))
            torch.testing.assert_close(
                logits[:, start : start + ids.shape[1]], single, rtol=0, atol=1e-4
            )
            loss, n = token_loss_sum(single, labels)
            total, count, start = total + loss, count + n, start + ids.shape[1]
    assert packed_count == count
    torch.testing.assert_close(packed_loss, total, rtol=1e-4, atol=1e-4)


def test_packed_gradients_equal_the_sum_over_examples(demo_examples):
    module = packed_test_module("sdpa", checkpointing=False)
    packed = PackedExamples(demo_examples, pack_rows(demo_examples.lengths().tolist(), 256))
    row = next(i for i, r in enumerate(packed.rows) if len(r) >= 3)
    batch = packed_collate([packed[row]], pad_token_id=0)
    lora = [p for p in module.parameters() if p.requires_grad]
    loss, _ = token_loss_sum(
        module(batch["input_ids"], position_ids=batch["position_ids"]), batch["labels"]
    )
    packed_grads = torch.autograd.grad(loss, lora)
    total = 0.0
    for member in packed.rows[row]:
        alone = demo_examples.example(member)
        ids = torch.tensor([alone["input_ids"]])
        total = total + token_loss_sum(module(ids), torch.tensor([alone["labels"]]))[0]
    for packed_grad, grad in zip(packed_grads, torch.autograd.grad(total, lora), strict=True):
        torch.testing.assert_close(packed_grad, grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attn", ["flex_attention"])
def test_backends_that_cannot_isolate_are_refused(attn, tmp_path):
    cfg = compose_config(
        [*TINY, "data.sample_packing=true", f"model.attn_implementation={attn}"], tmp_path
    )
    with pytest.raises(PackingError, match="cannot isolate"):
        check_config(cfg)


@pytest.mark.slow
def test_packed_training_runs_with_static_shapes_and_a_tiny_validation_split(tmp_path):
    overrides = [
        *TINY,
        "data.sample_packing=true",
        "data.pad_to_sequence_len=true",
        "data.sequence_len=512",
        "data.batch_size=2",
        "data.micro_batch_size=1",
        "trainer.val_check_interval=4",
    ]
    metrics = train(compose_config(overrides, tmp_path))
    # 24 validation examples fit in one or two rows: fewer than a batch, still validated.
    assert len(logged(tmp_path, "val/loss")) == 2
    assert logged(tmp_path, "train/loss")[-1] < logged(tmp_path, "train/loss")[0]
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
