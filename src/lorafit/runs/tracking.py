"""Experiment tracking: the run's config and code version as hyperparameters, and a Weights &
Biases logger that can watch gradients and upload the trained adapter."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


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


def _wandb_credentials() -> bool:
    """Whether wandb can log online without asking: a key, a login, or a chosen mode."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def finish(trainer: pl.Trainer) -> None:
    """Close the runs of loggers that keep one open: in a sweep, each trial is its own run."""
    for logger in trainer.loggers:
        if isinstance(logger, LightningWandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger plus Axolotl's `wandb_watch` and `wandb_log_model`.

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
        if not _wandb_credentials() and not kwargs.get("offline"):
            # No key and no login: record offline (sync later with `wandb sync`) rather than
            # fail or prompt. Checkpoint upload needs a connection, so it is switched off.
            log.warning("wandb: no API key or login found; logging offline under save_dir")
            kwargs.update(offline=True, log_model=False)
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
