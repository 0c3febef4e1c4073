"""Experiment tracking: the run's config and code version as hyperparameters, and a Weights &
Biases logger that can watch gradients and upload the trained adapter."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from omegaconf import DictConfig, OmegaConf


def git_commit(folder: Path | str = ".") -> str | None:
    """The checked-out commit of `folder` ("<sha>-dirty" with local changes), or None."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=folder, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def log_run_config(trainer: pl.Trainer, cfg: DictConfig) -> None:
    """Log the resolved config and the code version with every logger of the run."""
    params = {"config": OmegaConf.to_container(cfg, resolve=True), "git_commit": git_commit()}
    for logger in trainer.loggers:
        logger.log_hyperparams(params)


def finish(trainer: pl.Trainer) -> None:
    """Close the runs of loggers that keep one open: in a sweep, each trial is its own run."""
    for logger in trainer.loggers:
        if isinstance(logger, LightningWandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger plus the source config's `wandb_watch` and `wandb_log_model`.

    Args:
        watch: Log "gradients", "parameters" or "all" of the trained model (wandb.watch);
            None (the default) logs neither, as it slows training.
        watch_log_freq: Steps between watched logs.
        log_adapter: Upload the exported adapter folder as a model artifact at the end.
        **kwargs: Lightning's WandbLogger arguments (project, entity, name, save_dir, ...).
    """

    def __init__(
        self,
        watch: str | None = None,
        watch_log_freq: int = 100,
        log_adapter: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self._watch, self._watch_log_freq, self._log_adapter = watch, watch_log_freq, log_adapter

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        # Lightning calls this once at the start of fit, with the LightningModule.
        if self._watch:
            self.watch(model, log=self._watch, log_freq=self._watch_log_freq)

    def log_adapter_folder(self, folder: Path) -> None:
        if not self._log_adapter:
            return
        import wandb

        artifact = wandb.Artifact(name=f"adapter-{self.experiment.id}", type="model")
        artifact.add_dir(str(folder))
        self.experiment.log_artifact(artifact)
