"""`train(cfg)`: compose the run from its config, fine-tune, and return the final metrics."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lorafit.config_checks import check_config
from lorafit.module import CausalLMModule

log = logging.getLogger(__name__)


def _instantiate_each(group: DictConfig | None) -> list[Any]:
    """Loggers and callbacks are dicts of named entries; a null entry switches one off."""
    return [instantiate(entry) for entry in (group or {}).values() if entry is not None]


def train(cfg: DictConfig) -> dict[str, float]:
    """Fine-tune as `cfg` says and return the final logged metrics (train/loss, val/loss...).

    Bad config and bad data fail here before any model weight is loaded.
    """
    accumulate = check_config(cfg)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    datamodule.load_rows()  # bad rows fail now, before the tokenizer or model are fetched
    datamodule.tokenizer = instantiate(cfg.model.source).load_tokenizer()

    plain = OmegaConf.to_container(cfg, resolve=True)
    module = CausalLMModule(
        model=plain["model"],
        adapter=plain["adapter"],
        optimizer=plain["optimizer"],
        scheduler=plain["scheduler"],
    )
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        accumulate_grad_batches=accumulate,
        logger=_instantiate_each(cfg.get("logger")),
        callbacks=_instantiate_each(cfg.get("callbacks")),
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("resume_from_checkpoint"))
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    log.info("final metrics: %s", metrics)
    return metrics
