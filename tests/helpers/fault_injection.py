"""Callbacks that inject faults into a run: slow steps (to kill a run mid-way), heavy
checkpoints (to kill one mid-write), and NaN weights."""

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch


class SleepEachStep(pl.Callback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs) -> None:
        time.sleep(self.seconds)


class Ballast(pl.Callback):
    """Makes every checkpoint `megabytes` larger, so that writing one takes a while."""

    def __init__(self, megabytes: int):
        self.ballast = torch.zeros(megabytes * 2**20 // 4)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["ballast"] = self.ballast


class PoisonWeights(pl.Callback):
    """Sets the adapter weights to NaN once `at_step` optimizer steps have completed."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            with torch.no_grad():
                for name, parameter in pl_module.named_parameters():
                    if "lora_A" in name:
                        parameter.fill_(float("nan"))


ROOT = Path(__file__).resolve().parents[2]


def start_slow_run(folder: Path, overrides: list[str], seconds: float) -> subprocess.Popen:
    """`python train.py <overrides>` in a subprocess, each step slowed by `seconds`."""
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *overrides,
        f"output_dir={folder}",
        f"hydra.run.dir={folder}",
        "+callbacks.slow._target_=helpers.fault_injection.SleepEachStep",
        f"+callbacks.slow.seconds={seconds}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def wait_for(process: subprocess.Popen, ready: Callable[[], bool], timeout: float = 240) -> None:
    """Poll until `ready()`; fails if the process ends first or the timeout passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the run ended too early"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
