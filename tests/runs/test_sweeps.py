"""Sweeps and tracking: a Hydra grid, an Optuna search, the leaderboard across trials, a shared
data cache, and offline Weights & Biases."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from helpers import TINY, compose_config
from lorafit.eval import leaderboard
from lorafit.eval.sweep_leaderboard import LeaderboardAtSweepEnd
from lorafit.training import train

ROOT = Path(__file__).resolve().parents[2]
QUIET = [
    "trainer.log_every_n_steps=1",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
]


def _multirun(sweep: Path, *overrides: str) -> str:
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "experiment=tiny",
        *QUIET,
        f"hydra.sweep.dir={sweep}",
        f"data.dataset_prepared_path={sweep / 'prepared'}",
        *overrides,
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=600, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _leaderboard(sweep: Path) -> list[dict]:
    """The rows of the leaderboard the sweep itself wrote when its trials had returned."""
    with open(sweep / "leaderboard.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_a_grid_sweep_gives_four_runs_a_leaderboard_and_one_tokenization(tmp_path):
    sweep = tmp_path / "grid"
    printed = _multirun(sweep, "adapter.r=4,8", "optimizer.lr=1e-3,1e-2")
    rows = _leaderboard(sweep)
    assert list(rows[0])[:4] == ["rank", "trial", "overrides", "val/loss"]
    assert sorted(r["trial"] for r in rows) == ["0", "1", "2", "3"]
    losses = [float(r["val/loss"]) for r in rows]
    assert losses == sorted(losses)
    # The ranking is the trials' own final val/loss.
    finals = {t["trial"]: t["final"] for t in leaderboard.collect(sweep)}
    assert all(float(r["val/loss"]) == finals[r["trial"]]["val/loss"] for r in rows)
    assert {r["overrides"] for r in rows} == {
        f"adapter.r={r} optimizer.lr={lr}" for r in (4, 8) for lr in ("0.001", "0.01")
    }
    assert (sweep / "leaderboard.md").read_text().count("\n| ") == 6  # header, rule, 4 trials
    assert (sweep / "val_loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert f"1. trial {rows[0]['trial']}: val/loss=" in printed
    cached = [json.loads((sweep / n / "prepared_data.json").read_text()) for n in "0123"]
    assert [c["from_cache"] for c in cached] == [False, True, True, True]
    assert len({c["key"] for c in cached}) == 1


@pytest.mark.slow
def test_an_optuna_search_runs_its_trials_and_reports_the_best(tmp_path):
    sweep = tmp_path / "optuna"
    _multirun(sweep, "hparams_search=optuna", "hydra.sweeper.n_trials=3")
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    rows = _leaderboard(sweep)
    assert len(rows) == 3
    assert best["best_value"] == float(rows[0]["val/loss"])
    assert set(best["best_params"]) == {
        "optimizer.lr",
        "adapter.r",
        "adapter.alpha",
        "adapter.dropout",
        "scheduler.warmup_steps",
    }


def test_a_sweep_without_csv_logs_keeps_its_trials_and_says_why_it_has_no_leaderboard(
    tmp_path, capsys
):
    (tmp_path / "0" / "wandb").mkdir(parents=True)  # a trial logged to wandb only
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    LeaderboardAtSweepEnd().on_multirun_end(config)
    assert "no leaderboard for this sweep" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["0"]


@pytest.mark.slow
def test_offline_wandb_records_metrics_gradients_config_and_the_adapter(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = [
        *TINY,
        "logger=wandb",
        "logger.wandb.watch=gradients",
        "logger.wandb.watch_log_freq=1",
        "logger.wandb.log_adapter=true",
    ]
    train(compose_config(overrides, tmp_path))
    # run.finish() returns once wandb's service has the run's last records, not once its
    # writer has put them in the file: read before that (the full suite, once) and the
    # adapter's record was missing. Closing the service waits for its writers.
    import wandb

    wandb.teardown()
    (record,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    content = b"".join(_wandb_records(record.read_bytes()))
    for expected in (b"train/loss", b"val/loss", b"gradients/", b"git_commit", b"adapter-"):
        assert expected in content, expected


def _wandb_records(data: bytes) -> list[bytes]:
    """The records of a .wandb file, whole. The file is a LevelDB-style log: a 7-byte file
    header, then 32 KiB blocks in which a record longer than the space left is cut into
    fragments, each behind a 7-byte header (crc32, length, type). Searching the raw bytes
    fails whenever a string straddles a block boundary, which depends on how much was logged
    before it."""
    block, header = 32768, 7
    assert data[:4] == b":W&B", "not a wandb record file"
    records, current, position = [], b"", header
    while position + header <= len(data):
        if block - position % block < header:  # too little room for a header: block padding
            position += block - position % block
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        payload = data[position + header : position + header + length]
        position += header + length
        if kind == 0 and length == 0:
            break  # zeros: the unwritten end
        current += payload
        if kind in (1, 4):  # FULL or LAST: the record is complete
            records.append(current)
            current = b""
    return records


def test_the_resolved_config_and_commit_are_logged_as_hyperparameters(tmp_path):
    train(compose_config(TINY, tmp_path))
    hparams = yaml.safe_load((tmp_path / "csv" / "hparams.yaml").read_text())
    assert hparams["config"]["model"]["source"]["hidden_size"] == 64
    assert "git_commit" in hparams


@pytest.mark.slow
def test_wandb_without_key_or_login_logs_offline(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    train(compose_config([*TINY, "logger=wandb", "trainer.max_steps=2"], tmp_path / "run"))
    assert list((tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb"))


def test_tensorboard_writes_event_files(tmp_path):
    train(compose_config([*TINY, "logger=tensorboard", "trainer.max_steps=2"], tmp_path))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
