"""Resume is exact: a run killed with SIGKILL after a checkpoint and resumed produces the same
per-step losses as the run that was never interrupted; a mismatched resume is refused."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose_config, logged
from fault_injection import start_slow_run, wait_for
from lorafit.config_checks import ConfigError
from lorafit.training import train

# Dropout on, validation every 2 steps, a checkpoint after every step, all of them kept.
RUN = [
    *TINY,
    "adapter.dropout=0.1",
    "trainer.max_steps=10",
    "callbacks.model_checkpoint.every_n_train_steps=1",
    "callbacks.model_checkpoint.save_top_k=-1",
]


def _killed_run(folder: Path, kill_after: Path) -> None:
    """Run train.py in a subprocess and SIGKILL it as soon as `kill_after` exists."""
    process = start_slow_run(folder, RUN, seconds=0.5)
    try:
        wait_for(process, kill_after.exists)
        time.sleep(0.1)  # the file appears when its rename lands; let the step finish
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def test_a_killed_and_resumed_run_continues_the_same_losses(tmp_path):
    train(compose_config(RUN, tmp_path / "unbroken"))
    unbroken = logged(tmp_path / "unbroken", "train/loss")
    checkpoint = tmp_path / "killed" / "checkpoints" / "step000004.ckpt"
    _killed_run(tmp_path / "killed", kill_after=checkpoint.with_name("step000005.ckpt"))
    train(compose_config([*RUN, f"resume_from_checkpoint={checkpoint}"], tmp_path / "resumed"))
    resumed = logged(tmp_path / "resumed", "train/loss")
    assert len(unbroken) == 10 and len(resumed) == 6
    torch.testing.assert_close(resumed, unbroken[4:], rtol=0, atol=1e-6)
    assert checkpoint.is_file()  # the resumed run never deletes what it resumed from
    val_unbroken, val_resumed = (logged(tmp_path / n, "val/loss") for n in ("unbroken", "resumed"))
    torch.testing.assert_close(val_resumed, val_unbroken[-len(val_resumed) :], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("adapter.r=4", "adapter.r"),
        ("data.sequence_len=96", "data.sequence_len"),
        ("model.source.hidden_size=32", "model"),
    ],
)
def test_resuming_under_a_different_config_is_refused(tmp_path, change, named):
    train(compose_config([*TINY, "trainer.max_steps=2"], tmp_path / "first"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    again = [*TINY, "trainer.max_steps=4", f"resume_from_checkpoint={tmp_path / 'first'}", change]
    with pytest.raises(ConfigError, match=f"different run.*{named}"):
        train(compose_config(again, tmp_path / "second"))
    assert not (tmp_path / "second" / "checkpoints").exists()
    assert last.is_file()


def test_a_missing_resume_checkpoint_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope"):
        train(compose_config([*TINY, f"resume_from_checkpoint={tmp_path / 'nope'}"], tmp_path))


def test_resume_force_continues_despite_a_difference(tmp_path):
    train(compose_config([*TINY, "trainer.max_steps=2"], tmp_path / "first"))
    again = [
        *TINY,
        "trainer.max_steps=4",
        f"resume_from_checkpoint={tmp_path / 'first'}",
        "data.sequence_len=96",
        "resume_force=true",
    ]
    train(compose_config(again, tmp_path / "second"))
    assert len(logged(tmp_path / "second", "train/loss")) == 2
