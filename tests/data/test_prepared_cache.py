"""The prepared-data cache: a hit when nothing changed, a rebuild when anything that shapes
the data changed, and never a half-written entry trusted."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest

from lorafit.data import prepared_cache, prompts
from lorafit.data.datamodule import AlpacaDataModule
from lorafit.data.examples import TokenizedExamples
from lorafit.data.packing import pack_rows
from lorafit.model.sources import mistral_tokenizer

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
    )
    datamodule = AlpacaDataModule(**{**base, **settings})
    datamodule.connect(tokenizer)
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
    (name,) = _entries(tmp_path / "cache")
    entry = tmp_path / "cache" / name
    (entry / "complete.json").unlink()  # as if killed before the last write
    assert prepared_cache.load(tmp_path / "cache", entry.name) is None
    again = _datamodule(data_file, tmp_path / "cache", tokenizer)
    assert not again.prepared_from_cache and (entry / "complete.json").is_file()
    assert again.splits["train"].rows == first.splits["train"].rows


def _synthetic(index: int) -> dict[str, prepared_cache.PreparedSplit]:
    """Splits that depend on `index` only: packed for even indices, unpacked for odd ones."""
    rng = np.random.default_rng(index)
    splits = {}
    for name, count in (("train", 60), ("validation", 8)):
        examples = [
            {"input_ids": ids, "labels": ids}
            for ids in (rng.integers(0, 32000, int(n)).tolist() for n in rng.integers(2, 60, count))
        ]
        flat = TokenizedExamples.from_lists(examples)
        rows = pack_rows(flat.lengths().tolist(), 128) if index % 2 == 0 else None
        splits[name] = prepared_cache.PreparedSplit(flat, rows)
    return splits


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[n].rows == b[n].rows
        and all(
            np.array_equal(getattr(a[n].examples, f), getattr(b[n].examples, f))
            for f in ("input_ids", "labels", "offsets")
        )
        for n in a
    )


def _hammer(root: Path, keys: int, write: bool, barrier, done, results) -> None:
    problems = []
    expected = {i: _synthetic(i) for i in range(keys)}
    while True:
        for i in range(keys):
            try:
                if write:
                    barrier.wait()  # the writers build each key at the same moment
                    prepared_cache.save(root, f"k{i:03d}", expected[i])
                loaded = prepared_cache.load(root, f"k{i:03d}")
                if loaded is not None and not _same(loaded, expected[i]):
                    problems.append(f"k{i:03d}: loaded data differs from what was saved")
            except Exception as error:  # every failure counts, whatever its type
                problems.append(f"k{i:03d}: {type(error).__name__}: {error}")
        if write or done.is_set():
            break
    results.put(problems)


def test_concurrent_writers_and_readers_never_see_a_wrong_or_vanishing_entry(tmp_path):
    # Two writers publish the same 60 keys at once while a third process keeps loading them:
    # replacing a complete entry in place made readers fail or read packed data as unpacked.
    context = multiprocessing.get_context("fork")
    done, results, barrier = context.Event(), context.Queue(), context.Barrier(2)
    root = tmp_path / "cache"
    roles = [True, True, False]
    workers = [
        context.Process(target=_hammer, args=(root, 60, write, barrier, done, results))
        for write in roles
    ]
    for worker in workers:
        worker.start()
    problems = [results.get(timeout=300) for _ in roles[:2]]
    done.set()
    problems.append(results.get(timeout=300))
    for worker in workers:
        worker.join(timeout=60)
    found = [p for each in problems for p in each]
    assert found == [], f"{len(found)} failures, e.g. {found[:3]}"
    for i in range(60):  # every entry complete, equal to a fresh build, readable by the group
        assert _same(prepared_cache.load(root, f"k{i:03d}"), _synthetic(i))
        assert (root / f"k{i:03d}").stat().st_mode & 0o050 == 0o050
    assert not [p for p in root.iterdir() if "-building-" in p.name or "-stale-" in p.name]


def test_processes_preparing_the_same_key_at_once_build_it_once(tmp_path):
    context = multiprocessing.get_context("fork")
    results = context.Queue()

    def prepare(worker: int) -> None:
        def build():
            time.sleep(0.5)  # long enough for the others to arrive while this one builds
            return _synthetic(0)

        splits, cached = prepared_cache.load_or_build(tmp_path / "cache", "shared", build)
        results.put((cached, _same(splits, _synthetic(0))))

    workers = [context.Process(target=prepare, args=(n,)) for n in range(3)]
    for worker in workers:
        worker.start()
    outcomes = sorted(results.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert outcomes == [(False, True), (True, True), (True, True)]
