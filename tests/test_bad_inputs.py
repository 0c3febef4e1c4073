"""Bad input, table-driven: each case stops with one message naming the key, file, row or
field, before any model weight is loaded, and leaves an existing run folder as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import CONF_DIR, TINY, compose_config
from lorafit.errors import LorafitError
from lorafit.strict_config import unknown_key_error
from lorafit.training import train

GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}

# (case, overrides, data file (name, text) or None, message pattern)
CASES = [
    ("rank zero", ["adapter.r=0"], None, r"adapter\.r=0: expected an integer > 0"),
    ("fractional rank", ["adapter.r=2.5"], None, r"adapter\.r=2\.5"),
    ("dropout of one", ["adapter.dropout=1.0"], None, r"adapter\.dropout=1\.0"),
    ("negative alpha", ["adapter.alpha=-1"], None, r"adapter\.alpha=-1"),
    ("validation share over one", ["data.val_set_size=1.5"], None, r"data\.val_set_size=1\.5"),
    ("sequence of one token", ["data.sequence_len=1"], None, r"data\.sequence_len=1"),
    ("batch not a multiple", ["data.batch_size=6"], None, r"batch_size=6 is not a multiple"),
    ("micro-batch of zero", ["data.micro_batch_size=0"], None, r"data\.micro_batch_size=0"),
    ("learning rate zero", ["optimizer.lr=0"], None, r"optimizer\.lr=0"),
    ("unknown dtype", ["model.dtype=float8"], None, r"model\.dtype='float8'"),
    ("unknown attention", ["model.attn_implementation=banana"], None, r"attn_implementation"),
    (
        "packing that cannot isolate",
        ["data.sample_packing=true", "model.attn_implementation=flex_attention"],
        None,
        r"flex_attention.*cannot isolate",
    ),
    ("unknown overlong policy", ["data.overlong=cut"], None, r"data\.overlong='cut'"),
    ("local data without a path", ["data=local"], None, r"set data\.datasets\.0\.path"),
    (
        "missing resume checkpoint",
        ["resume_from_checkpoint=/nowhere/last.ckpt"],
        None,
        r"resume_from_checkpoint=/nowhere/last\.ckpt",
    ),
    (
        "missing data file",
        ["data=local", "data.datasets.0.path=/nowhere/rows.json"],
        None,
        r"data file not found: /nowhere/rows\.json",
    ),
    (
        "row without output",
        [],
        ("rows.jsonl", [GOOD, {"instruction": "x"}]),
        r"rows\.jsonl: row 1 has no 'output'",
    ),
    (
        "row without instruction",
        [],
        ("rows.jsonl", [GOOD, {"output": "x"}]),
        r"rows\.jsonl: row 1 has no 'instruction'",
    ),
    (
        "output not text",
        [],
        ("rows.jsonl", [GOOD, {**GOOD, "output": 7}]),
        r"row 1 field 'output' is int",
    ),
    ("empty file", [], ("rows.json", ""), r"rows\.json: the data set is empty"),
    ("empty list", [], ("rows.json", []), r"rows\.json: the data set is empty"),
    (
        "unsupported file type",
        [],
        ("rows.csv", "instruction,output\nx,y\n"),
        r"rows\.csv: unsupported file type '\.csv'",
    ),
    ("broken JSON", [], ("rows.json", '[{"instruction": "x", '), r"could not be read as json"),
    (
        "no training rows left",
        ["data.val_set_size=0.9"],
        ("rows.json", [GOOD, GOOD]),
        r"leaves no training rows out of 2",
    ),
    (
        "every example too long",
        ["data.overlong=drop", "data.sequence_len=8"],
        ("rows.json", [GOOD] * 4),
        r"no usable example at sequence_len=8",
    ),
]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("case", "overrides", "data", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_stops_with_one_message_and_damages_nothing(
    tmp_path, case, overrides, data, message
):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.yaml").write_text("a previous run's config\n")
    (out / "checkpoints" / "last.ckpt").write_bytes(b"a previous run's checkpoint")
    before = _snapshot(out)
    if data is not None:
        name, content = data
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        overrides = ["data=local", f"data.datasets.0.path={path}", *overrides]
    with pytest.raises(LorafitError, match=message) as error:
        train(compose_config([*TINY, *overrides], out))
    assert "\n" not in str(error.value)  # one line
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    ("override", "meant"),
    [
        ("adapter.lora_r=8", "adapter.r"),
        ("learning_rate=1e-4", "optimizer.lr"),
        ("trainer.max_step=3", "trainer.max_steps"),
        ("data.sequenc_len=64", "data.sequence_len"),
    ],
)
def test_an_unknown_key_suggests_the_key_meant(override, meant):
    message = unknown_key_error(["experiment=tiny", override], CONF_DIR)
    assert f"unknown config key '{override.split('=')[0]}'" in message
    assert f"did you mean {meant}" in message


def test_known_keys_and_sweeps_pass_the_unknown_key_check():
    assert unknown_key_error(["experiment=tiny", "adapter.r=8"], CONF_DIR) is None
    assert unknown_key_error(["adapter.r=8,16"], CONF_DIR) is None
