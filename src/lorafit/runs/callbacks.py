"""Callbacks that write a run's shareable results next to its checkpoints."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch import callbacks
from lightning.pytorch.utilities import rank_zero_only

from lorafit.errors import ConfigError, LossDivergedError

log = logging.getLogger(__name__)


class ModelCheckpoint(callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, which can also save `saves_per_epoch` times an epoch
    (Axolotl's saves_per_epoch): every_n_train_steps becomes the epoch's optimizer steps // N
    (at least 1), worked out when the run starts and the data's size is known.

    The same class name as Lightning's on purpose: a callback's saved state is filed under its
    class name, so runs checkpointed with either resume with the other.

    Args:
        saves_per_epoch: Checkpoints an epoch; None keeps every_n_train_steps as given.
        **kwargs: Lightning's ModelCheckpoint arguments.
    """

    def __init__(self, saves_per_epoch: int | None = None, **kwargs: Any):
        if saves_per_epoch is not None:
            kwargs["every_n_train_steps"] = None  # replaced in setup
        super().__init__(**kwargs)
        self.saves_per_epoch = saves_per_epoch

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.saves_per_epoch is None or stage != "fit":
            return
        datamodule = getattr(trainer, "datamodule", None)
        if not hasattr(datamodule, "optimizer_steps_per_epoch"):
            raise ConfigError("saves_per_epoch needs lorafit's data module to size the epoch")
        steps = datamodule.optimizer_steps_per_epoch(trainer.world_size)
        self._every_n_train_steps = max(1, steps // self.saves_per_epoch)
        self._every_n_epochs = 0
        log.info(
            "saves_per_epoch=%d: a checkpoint every %d of the epoch's %d optimizer steps",
            self.saves_per_epoch,
            self._every_n_train_steps,
            steps,
        )


class BestCheckpoint(callbacks.ModelCheckpoint):
    """A ModelCheckpoint whose best score survives a resume into a new run folder.

    Lightning restores the best score only when the checkpoint folder is unchanged, and a
    resumed run writes into its own folder; its "best" would then be best since the resume.
    Here the resumed run starts from the source run's best (score and file, which stays where
    it is and is never deleted), so a `best-*.ckpt` in the new folder is best over the whole run.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        moved = state_dict.get("dirpath", self.dirpath) != self.dirpath
        if moved and state_dict.get("best_model_score") is not None:
            self.best_model_score = state_dict["best_model_score"]
            self.best_k_models = dict(state_dict.get("best_k_models") or {})
            self.kth_best_model_path = state_dict.get("kth_best_model_path", "")
            self.kth_value = state_dict.get("kth_value", self.kth_value)
            log.info(
                "best %s so far: %.6g in %s (from the resumed run)",
                self.monitor,
                float(self.best_model_score),
                self.best_model_path,
            )


class ExportAdapter(pl.Callback):
    """At the end of training, save the adapter in peft's own format.

    The folder (`adapter_config.json` + `adapter_model.safetensors`, plus the tokenizer) loads
    with `PeftModel.from_pretrained(base, folder)`. A full fine-tune (`adapter=none`) saves the
    whole model as a transformers folder instead.

    Args:
        dirpath: Where to write; created if missing.
    """

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    @rank_zero_only
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        pl_module.model.save_pretrained(self.dirpath)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.dirpath)
        log.info("saved the trained weights in %s", self.dirpath)
        for logger in trainer.loggers:
            if hasattr(logger, "log_adapter_folder"):
                logger.log_adapter_folder(self.dirpath)


class LossWatchdog(pl.Callback):
    """Stop the run when a step's loss is not finite or exceeds `max_loss`.

    Checked before the optimizer applies the step, so the weights (and every checkpoint) stay
    those of the last good step; the error names the step and the last checkpoint.

    Args:
        max_loss: Largest acceptable step loss; None checks finiteness only.
    """

    def __init__(self, max_loss: float | None = None):
        self.max_loss = max_loss

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        value = float(pl_module.step_loss)
        if math.isfinite(value) and (self.max_loss is None or value <= self.max_loss):
            return
        checkpoint = trainer.checkpoint_callback
        last = getattr(checkpoint, "last_model_path", "") or getattr(
            checkpoint, "best_model_path", ""
        )
        limit = "" if self.max_loss is None else f" (watchdog max_loss={self.max_loss})"
        raise LossDivergedError(
            f"train/loss became {value} at step {trainer.global_step + 1}{limit}; the last "
            f"good checkpoint is {last or 'not saved yet'}: resume from it with a lower "
            "optimizer.lr, or raise callbacks.loss_watchdog.max_loss"
        )


class SaveOnSigterm(pl.Callback):
    """On SIGTERM (what clusters send before preemption), finish the optimizer step in progress,
    save `last.ckpt`, and let Lightning stop the run.

    Lightning stops at the end of the micro-batch during which the signal arrived; mid
    gradient accumulation that would lose part of a step, so the stop is held back until the
    step completes, and the checkpoint resumes exactly.

    Args:
        dirpath: The checkpoint folder; the checkpoint is `last.ckpt` in it.
    """

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None
        self._step_at_start = 0
        self._held = False  # a SIGTERM arrived mid-step and waits for the step to finish

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not trainer.received_sigterm and not self._held:
            return
        if trainer.global_step == self._step_at_start:  # mid-accumulation: hold the stop
            self._held = True
            _set_received_sigterm(trainer, False)
            return
        self.saved = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(self.saved)
        log.warning("SIGTERM: saved %s at step %d; stopping", self.saved, trainer.global_step)
        self._held = False
        _set_received_sigterm(trainer, True)


def _set_received_sigterm(trainer: pl.Trainer, value: bool) -> None:
    # `Trainer.received_sigterm` is read-only (Lightning 2.6): the flag is its signal
    # connector's, which Lightning's SIGTERM handler sets and its loops read.
    trainer._signal_connector.received_sigterm = value
