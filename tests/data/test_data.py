"""Data loading, checking, splitting and step-aware batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import TINY, compose_config
from lorafit.constants import IGNORE_INDEX
from lorafit.data.batching import StepBatchSampler, label_tokens, pad_collate
from lorafit.data.datamodule import split_rows
from lorafit.data.examples import TokenizedExamples
from lorafit.data.sources import load_rows
from lorafit.errors import DataError, ModelSourceError
from lorafit.model.sources import HubModel
from lorafit.training import build_run

ROWS = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(20)]


def _write(path: Path, rows, jsonl: bool = False) -> Path:
    text = "\n".join(json.dumps(r) for r in rows) if jsonl else json.dumps(rows)
    path.write_text(text)
    return path


def test_builtin_demo_set_loads_and_is_alpaca():
    rows = load_rows([{"path": "builtin:demo_alpaca", "type": "alpaca"}])
    assert len(rows) >= 200
    assert 0.2 < sum(bool(r["input"]) for r in rows) / len(rows) < 0.8


@pytest.mark.parametrize("jsonl", [False, True])
def test_local_json_and_jsonl_load(tmp_path, jsonl):
    path = _write(tmp_path / ("rows.jsonl" if jsonl else "rows.json"), ROWS, jsonl)
    assert load_rows([{"path": str(path)}]) == ROWS


def test_local_parquet_loads(tmp_path):
    import datasets

    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    assert load_rows([{"path": str(path)}]) == ROWS


def test_real_alpaca_rows_load(shared_alpaca):
    rows = load_rows([{"path": str(shared_alpaca)}])
    assert len(rows) == 999 and sum(bool(r["input"]) for r in rows) == 412


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "empty"),
        ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], "row 1 has no 'output'"),
        ([{"instruction": "a", "output": "b"}, {"output": "d"}], "row 1 has no 'instruction'"),
        ([{"instruction": "a", "output": 3}], "row 0 field 'output' is int"),
        ([{"instruction": " ", "output": "b"}], "row 0 has an empty 'instruction'"),
        ([{"prompt": "a", "completion": "b"}], "no row has the field 'instruction'"),
    ],
)
def test_bad_rows_name_row_and_field(tmp_path, rows, message):
    path = _write(tmp_path / "bad.jsonl", rows, jsonl=True)
    with pytest.raises(DataError, match=message) as error:
        load_rows([{"path": str(path)}])
    assert str(path) in str(error.value)


def test_missing_file_names_its_path(tmp_path):
    with pytest.raises(DataError, match=f"data file not found: {tmp_path}/nope.json"):
        load_rows([{"path": str(tmp_path / "nope.json")}])


def test_hub_data_set_offline_names_the_repo(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="mhenrichsen/alpaca_2k_test"):
        load_rows([{"path": "mhenrichsen/alpaca_2k_test", "type": "alpaca"}])


def test_hub_model_offline_is_a_clear_error():
    with pytest.raises(ModelSourceError, match="mistralai/Mistral-7B-v0.1"):
        HubModel("mistralai/Mistral-7B-v0.1").load_tokenizer()


def test_split_is_deterministic_and_disjoint():
    train, val = split_rows(ROWS, 0.1, seed=1)
    assert (len(train), len(val)) == (18, 2)
    assert split_rows(ROWS, 0.1, seed=1) == (train, val)
    assert split_rows(ROWS, 0.1, seed=2) != (train, val)
    assert sorted(r["output"] for r in train + val) == sorted(r["output"] for r in ROWS)
    assert len(split_rows(ROWS, 5, seed=1)[1]) == 5
    assert split_rows(ROWS, 0, seed=1) == (ROWS, [])


@pytest.mark.parametrize(
    ("rows", "size", "message"),
    [
        (10, 20, "no training"),
        (10, 0.99, "no training"),
        (1, 0.1, "no training"),
    ],
)
def test_empty_splits_are_errors(rows, size, message):
    with pytest.raises(DataError, match=message):
        split_rows(ROWS[:rows], size, seed=0)


def test_empty_json_list_is_an_empty_data_set(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load_rows([{"path": str(_write(tmp_path / "rows.json", []))}])


def test_bad_data_fails_before_the_run_folder_is_written(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c"}]
    path = _write(tmp_path / "bad.jsonl", rows, jsonl=True)
    out = tmp_path / "run"
    cfg = compose_config([*TINY, "data=local", f"data.datasets.0.path={path}"], out)
    with pytest.raises(DataError, match="row 1 has no 'output'"):
        build_run(cfg)
    assert not out.exists()


def _sampler(counts, batch, micro, **kw):
    return StepBatchSampler(counts, batch, micro, shuffle=True, seed=3, **kw)


def test_sampler_tags_micro_batches_with_their_step_tokens():
    counts = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    micro = list(_sampler(counts, batch=4, micro=2))
    assert [len(m) for m in micro] == [2, 2, 2, 2, 2]
    for first, second in (micro[0:2], micro[2:4]):
        step = first + second
        assert {t for _, t in step} == {sum(counts[i] for i, _ in step)}
    assert sorted(i for m in micro for i, _ in m) == list(range(10))
    assert len(_sampler(counts, batch=4, micro=2)) == 5


def test_sampler_reshuffles_per_epoch_and_repeats_per_seed():
    a, b = _sampler(range(50), 10, 5), _sampler(range(50), 10, 5)
    first = list(a)
    assert first == list(b)
    a.set_epoch(1)
    assert list(a) != first


def test_sampler_shards_each_global_batch_across_ranks():
    counts = list(range(1, 17))
    ranks = [list(_sampler(counts, 8, 2, world_size=2, rank=r, drop_last=True)) for r in (0, 1)]
    assert [len(r) for r in ranks] == [4, 4]
    first_step = ranks[0][:2] + ranks[1][:2]
    assert {t for m in first_step for _, t in m} == {
        sum(counts[i] for m in first_step for i, _ in m)
    }
    assert len({i for r in ranks for m in r for i, _ in m}) == 16


def test_collate_pads_and_masks():
    examples = [
        {"input_ids": [1, 5, 6, 2], "labels": [IGNORE_INDEX, IGNORE_INDEX, 6, 2]},
        {"input_ids": [1, 7], "labels": [IGNORE_INDEX, 7]},
    ]
    data = TokenizedExamples.from_lists(examples)
    batch = pad_collate([data[(0, 9)], data[(1, 9)]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX]
    assert int(batch["step_tokens"]) == 9
    assert [label_tokens(e["labels"]) for e in examples] == [2, 1]


def test_label_counts_match_per_example_counting():
    examples = [
        {"input_ids": [1, 5, 6, 2], "labels": [IGNORE_INDEX, IGNORE_INDEX, 6, 2]},
        {"input_ids": [1, 7], "labels": [1, 7]},
        {"input_ids": [3], "labels": [3]},
    ]
    flat = TokenizedExamples.from_lists(examples)
    assert flat.label_counts() == [label_tokens(e["labels"]) for e in examples] == [2, 1, 0]


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize(("batch", "micro"), [(8, 4), (6, 2), (4, 4)])
def test_the_datamodule_counts_the_steps_its_loader_gives(packing, batch, micro):
    from lorafit.data.datamodule import AlpacaDataModule
    from lorafit.model.sources import mistral_tokenizer

    datamodule = AlpacaDataModule(
        datasets=[{"path": "builtin:demo_alpaca", "type": "alpaca"}],
        sequence_len=256,
        val_set_size=0.1,
        train_on_inputs=False,
        batch_size=batch,
        micro_batch_size=micro,
        sample_packing=packing,
    )
    datamodule.connect(mistral_tokenizer())
    datamodule.setup("fit")
    micro_batches = list(datamodule.train_dataloader())
    assert datamodule.train_batches_per_epoch() == len(micro_batches)
    # A step is batch / micro micro-batches; the last step of an epoch may have fewer.
    steps = -(-len(micro_batches) // (batch // micro))
    assert datamodule.optimizer_steps_per_epoch() == steps
    # Two ranks share each global batch: half the micro-batches each, the same steps.
    if batch % (2 * micro) == 0:
        assert datamodule.optimizer_steps_per_epoch(world_size=2) == steps - (
            len(datamodule.dataset("train")) % batch != 0
        )
        assert datamodule.train_batches_per_epoch(world_size=2) == (
            datamodule.optimizer_steps_per_epoch(world_size=2) * batch // (2 * micro)
        )
