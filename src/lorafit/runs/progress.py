"""A progress bar that counts what the run counts: optimizer steps, over the whole run."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar

# What the bar shows of the logged metrics, under names short enough for one line.
SHOWN = {"train/loss": "loss", "train/tokens_per_s": "tokens/s", "val/loss": "val_loss"}


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, counting optimizer steps of the whole run.

    Lightning's bar counts micro-batches of one epoch: a 4-step run with 2 micro-batches a
    step over a 27-step epoch shows `8/54`, with an ETA for the 54. This one shows `4/4`, the
    total being `trainer.max_steps` when set and the epochs' steps otherwise, and a resumed
    run starts at the step it resumed from.
    """

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else math.inf
        total = per_epoch * epochs
        return min(total, trainer.max_steps) if trainer.max_steps > 0 else total

    def _get_train_description(self, current_epoch: int) -> str:
        epochs = self.trainer.max_epochs
        if self.trainer.max_steps > 0 or epochs in (None, -1):
            return "train"
        return f"epoch {current_epoch + 1}/{epochs}"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # One task for the whole run: a new epoch renames it rather than restarting it.
        if self.is_disabled or self.progress is None:
            return
        description = self._get_train_description(trainer.current_epoch)
        if self.train_progress_bar_id is None:
            self.train_progress_bar_id = self._add_task(self.total_train_batches, description)
            self._update(self.train_progress_bar_id, trainer.global_step)
        else:
            self.progress.update(self.train_progress_bar_id, description=description)
        self.refresh()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # a resume that starts mid-epoch
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        return {short: metrics[name] for name, short in SHOWN.items() if name in metrics}
