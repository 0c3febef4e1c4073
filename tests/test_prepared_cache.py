"""The prepared-data cache: a hit when nothing changed, a rebuild when anything that shapes
the data changed, and never a half-written entry trusted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lorafit import prepared_cache, prompts
from lorafit.datamodule import AlpacaDataModule
from lorafit.examples import TokenizedExamples
from lorafit.model_sources import mistral_tokenizer

ROWS = [
    {"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else f"{i}", "output": str(2 * i)}
    for i in range(40)
]


@pytest.fixture(scope="module")
def tokenizer():
    return mistral_tokenizer()


def _datamodule(data_file: Path, cache: Path, tokenizer, **settings) -> AlpacaDataModule:
    base = dict(
        datasets=[{"path": str(data_file)}],
        sequence_len=128,
        val_set_size=0.1,
        train_on_inputs=False,
        batch_size=4,
        micro_batch_size=2,
        sample_packing=True,
        dataset_prepared_path=str(cache),
        tokenizer=tokenizer,
    )
    datamodule = AlpacaDataModule(**{**base, **settings})
    datamodule.setup("fit")
    return datamodule


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS))
    return path


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))


def test_a_second_run_loads_the_same_data_without_tokenizing(data_file, tmp_path, tokenizer):
    first = _datamodule(data_file, tmp_path / "cache", tokenizer)
    second = _datamodule(data_file, tmp_path / "cache", tokenizer)
    assert (first.prepared_from_cache, second.prepared_from_cache) == (False, True)
    for split in ("train", "validation"):
        a, b = first.splits[split], second.splits[split]
        assert np.array_equal(a.examples.input_ids, b.examples.input_ids)
        assert np.array_equal(a.examples.labels, b.examples.labels)
        assert a.rows == b.rows
    assert len(_entries(tmp_path / "cache")) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"sequence_len": 96},
        {"train_on_inputs": True},
        {"val_set_size": 0.2},
        {"seed": 1},
        {"sample_packing": False},
        {"overlong": "drop"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_every_data_setting_is_part_of_the_key(data_file, tmp_path, tokenizer, change):
    _datamodule(data_file, tmp_path / "cache", tokenizer)
    changed = _datamodule(data_file, tmp_path / "cache", tokenizer, **change)
    assert not changed.prepared_from_cache
    assert len(_entries(tmp_path / "cache")) == 2


def test_edited_data_is_a_new_key(data_file, tmp_path, tokenizer):
    _datamodule(data_file, tmp_path / "cache", tokenizer)
    data_file.write_text(json.dumps([*ROWS[:-1], {**ROWS[-1], "output": "changed"}]))
    assert not _datamodule(data_file, tmp_path / "cache", tokenizer).prepared_from_cache


def test_a_changed_tokenizer_is_a_new_key(data_file, tmp_path, tokenizer):
    _datamodule(data_file, tmp_path / "cache", tokenizer)
    other = mistral_tokenizer()
    other.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    assert not _datamodule(data_file, tmp_path / "cache", other).prepared_from_cache


def test_a_changed_prompt_template_is_a_new_key(data_file, tmp_path, tokenizer, monkeypatch):
    _datamodule(data_file, tmp_path / "cache", tokenizer)
    monkeypatch.setattr(prompts, "ALPACA_NO_INPUT", prompts.ALPACA_NO_INPUT.replace("task", "job"))
    assert not _datamodule(data_file, tmp_path / "cache", tokenizer).prepared_from_cache


def test_a_crash_mid_write_leaves_nothing_trusted(data_file, tmp_path, tokenizer, monkeypatch):
    calls = []

    def save_then_die(self, folder):
        calls.append(folder)
        if len(calls) == 2:  # the validation split: the train split is already on disk
            raise KeyboardInterrupt("killed mid-write")
        original(self, folder)

    original = TokenizedExamples.save
    monkeypatch.setattr(TokenizedExamples, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _datamodule(data_file, tmp_path / "cache", tokenizer)
    monkeypatch.setattr(TokenizedExamples, "save", original)
    assert _entries(tmp_path / "cache") == []
    assert not _datamodule(data_file, tmp_path / "cache", tokenizer).prepared_from_cache


def test_an_entry_without_its_completion_mark_is_rebuilt(data_file, tmp_path, tokenizer):
    first = _datamodule(data_file, tmp_path / "cache", tokenizer)
    (entry,) = (tmp_path / "cache").iterdir()
    (entry / "complete.json").unlink()  # as if killed before the last write
    assert prepared_cache.load(tmp_path / "cache", entry.name) is None
    again = _datamodule(data_file, tmp_path / "cache", tokenizer)
    assert not again.prepared_from_cache and (entry / "complete.json").is_file()
    assert again.splits["train"].rows == first.splits["train"].rows
