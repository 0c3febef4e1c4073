"""Callbacks that write a run's shareable results next to its checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


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
