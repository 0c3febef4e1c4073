"""Faults a long run must survive: SIGTERM, a kill in the middle of a checkpoint write, and a
loss that diverges."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import TINY, compose_config, logged
from helpers.fault_injection import start_slow_run, wait_for
from lorafit.errors import LossDivergedError
from lorafit.training import train

RUN = [
    *TINY,
    "adapter.dropout=0.1",
    "trainer.max_steps=8",
    "data.micro_batch_size=2",
    "callbacks.model_checkpoint.every_n_train_steps=1",
]


def _start(folder: Path, *extra: str) -> subprocess.Popen:
    return start_slow_run(folder, [*RUN, *extra], seconds=0.4)


@pytest.mark.slow
def test_sigterm_saves_a_step_boundary_checkpoint_that_resumes_exactly(tmp_path):
    train(compose_config(RUN, tmp_path / "unbroken"))
    unbroken = logged(tmp_path / "unbroken", "train/loss")
    folder = tmp_path / "preempted"
    process = _start(folder)
    # Micro-batches of 2 and batches of 8: 4 micro-batches a step, so the signal most likely
    # lands mid-accumulation, and the save must wait for the step to finish.
    wait_for(process, lambda: (folder / "checkpoints" / "step000002.ckpt").exists())
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    state = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    steps = state["global_step"]
    assert 2 <= steps < 8
    train(compose_config([*RUN, f"resume_from_checkpoint={folder}"], tmp_path / "resumed"))
    resumed = logged(tmp_path / "resumed", "train/loss")
    torch.testing.assert_close(resumed, unbroken[steps:], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    folder = tmp_path / "run"
    # 200 MB of ballast per checkpoint makes each write long enough to be caught in the act.
    process = _start(
        folder,
        "+callbacks.ballast._target_=helpers.fault_injection.Ballast",
        "+callbacks.ballast.megabytes=200",
    )
    checkpoints = folder / "checkpoints"
    wait_for(
        process,
        lambda: (checkpoints / "last.ckpt").exists() and any(checkpoints.glob(".*.partial")),
    )
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    state = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert state["global_step"] >= 1 and state["state_dict"]
    assert not [p for p in checkpoints.glob("*.ckpt") if p.stat().st_size == 0]


def test_a_nan_loss_stops_the_run_naming_the_step_and_the_last_checkpoint(tmp_path):
    overrides = [
        *TINY,
        "trainer.max_steps=8",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "+callbacks.poison._target_=helpers.fault_injection.PoisonWeights",
        "+callbacks.poison.at_step=3",
    ]
    with pytest.raises(LossDivergedError, match=r"nan at step 4.*last good checkpoint is .*ckpt"):
        train(compose_config(overrides, tmp_path))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())


def test_the_watchdog_threshold_stops_a_loss_above_it(tmp_path):
    overrides = [*TINY, "callbacks.loss_watchdog.max_loss=5.0"]
    with pytest.raises(LossDivergedError, match="max_loss=5.0"):
        train(compose_config(overrides, tmp_path))


def test_a_sigterm_in_process_saves_a_step_boundary_checkpoint_and_stops(tmp_path):
    """`trainer.fit` in this process (a notebook, a Hydra sweep's basic launcher): the signal
    goes to Lightning's handler, and SaveOnSigterm must hold and release the stop through it."""
    import os

    import lightning.pytorch as pl
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lorafit.training import build_run

    class Terminate(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 2 and not trainer.received_sigterm:
                # Lightning's own handler, never the default one, which would end pytest.
                assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
                os.kill(os.getpid(), signal.SIGTERM)

    run = build_run(compose_config(RUN, tmp_path))
    run.trainer.callbacks.append(Terminate())
    with pytest.raises(SIGTERMException):
        run.trainer.fit(run.module, datamodule=run.datamodule)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 3  # the step in progress finished, then the stop
