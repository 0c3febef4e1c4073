"""`train(cfg)`: compose the run from its config, fine-tune, and return the final metrics."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from lorafit.config_checks import check_config, check_machine, devices_count
from lorafit.data.datamodule import FineTuneDataModule
from lorafit.errors import ConfigError
from lorafit.folders import writable_folder
from lorafit.model.module import CausalLMModule, build_module
from lorafit.model.shape_checks import check_model_fits
from lorafit.model.sources import set_special_tokens
from lorafit.runs.checkpoints import check_adapter_folder
from lorafit.runs.resume import check_matches, checkpoint_path, fingerprint
from lorafit.runs.tracking import finish as finish_trackers
from lorafit.runs.tracking import log_run_config

log = logging.getLogger(__name__)


def _instantiate(key: str, node: DictConfig, **kwargs: Any) -> Any:
    try:
        return instantiate(node, **kwargs)
    except (InstantiationException, ValueError, TypeError) as error:
        raise ConfigError.refused(key, error) from error


def _instantiate_each(group: str, cfg: DictConfig) -> list[Any]:
    """Loggers and callbacks are dicts of named entries; a null entry switches one off."""
    entries = (cfg.get(group) or {}).items()
    return [_instantiate(f"{group}.{name}", entry) for name, entry in entries if entry is not None]


def _check_optimization(cfg: DictConfig) -> None:
    """Build the optimizer and schedule on a stand-in parameter: their own checks (betas,
    weight decay, momentum...) then fail now, not after the model has loaded."""
    stand_in = [torch.nn.Parameter(torch.zeros(2))]
    try:
        optimizer = instantiate(cfg.optimizer)(stand_in)
    except Exception as error:  # noqa: BLE001 - optimizers refuse values with many types
        raise ConfigError.refused("optimizer", error) from error
    try:
        instantiate(cfg.scheduler)(optimizer, num_training_steps=max(cfg.trainer.max_steps, 1))
    except Exception as error:  # noqa: BLE001
        raise ConfigError.refused("scheduler", error) from error


def _callbacks(cfg: DictConfig) -> list[Callback]:
    callbacks = _instantiate_each("callbacks", cfg)
    if not cfg.trainer.get("enable_progress_bar", True):
        # Lightning refuses a progress bar callback when the bar is switched off; the switch is
        # what the user asked for, so the callback goes.
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


def _fit_validation_interval(cfg: DictConfig, datamodule: FineTuneDataModule) -> None:
    """Lightning refuses a validation interval (in batches) longer than an epoch, which sample
    packing makes easy to ask for: validate at each epoch's end instead, and say so."""
    interval = cfg.trainer.get("val_check_interval")
    if not isinstance(interval, int) or isinstance(interval, bool):
        return
    batches = datamodule.train_batches_per_epoch(devices_count(cfg.trainer))
    if interval > batches:
        log.warning(
            "trainer.val_check_interval=%d is more than the %d training batches of an epoch "
            "(packing makes few rows): validating at the end of each epoch instead",
            interval,
            batches,
        )
        cfg.trainer.val_check_interval = batches


@dataclass
class Run:
    """What a run is made of, wired from one config and not yet fitted."""

    trainer: pl.Trainer
    module: CausalLMModule
    datamodule: FineTuneDataModule
    resume: Path | None = None  # the checkpoint to continue from, checked against this run


def build_run(cfg: DictConfig) -> Run:
    """Check the config and the data, then build trainer, module and data module.

    Bad config and bad data fail here, before any model weight is loaded and before anything
    is written; then the run folder gets the resolved config.
    """
    accumulate = check_config(cfg)
    check_machine(cfg)
    _check_optimization(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = _instantiate("data", cfg.data)
    datamodule.load_rows()
    check_model_fits(cfg)  # LoRA targets and positions, from the model's shape alone
    if cfg.adapter.get("lora_model_dir"):
        check_adapter_folder(Path(cfg.adapter.lora_model_dir), "adapter.lora_model_dir")
    tokenizer = instantiate(cfg.model.source).load_tokenizer()
    datamodule.connect(set_special_tokens(tokenizer, cfg.model.get("special_tokens")))
    datamodule.setup("fit")  # tokenize and pack now: data that cannot train fails here
    _fit_validation_interval(cfg, datamodule)
    resume = checkpoint_path(cfg.resume_from_checkpoint)
    run_fingerprint = fingerprint(cfg, datamodule.load_rows())
    if resume is not None:
        check_matches(resume, run_fingerprint, cfg.resume_force)
    trainer = _instantiate(
        "trainer",
        cfg.trainer,
        accumulate_grad_batches=accumulate,
        logger=_instantiate_each("logger", cfg),
        callbacks=_callbacks(cfg),
    )

    output_dir = writable_folder("output_dir", cfg.output_dir)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if datamodule.dataset_prepared_path:
        # Which prepared data the run used, and whether it came from the cache.
        record = {"key": datamodule.cache_key, "from_cache": datamodule.prepared_from_cache}
        (output_dir / "prepared_data.json").write_text(json.dumps(record) + "\n")
    module = build_module(cfg, fingerprint=run_fingerprint)
    return Run(trainer, module, datamodule, resume)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fine-tune as `cfg` says and return the final logged metrics (train/loss, val/loss...)."""
    run = build_run(cfg)
    log_run_config(run.trainer, cfg)
    if cfg.validate_before_training:
        # The untrained baseline, logged at step 0, so the curve shows what training changed.
        run.trainer.validate(run.module, datamodule=run.datamodule)
    try:
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.resume)
    except SIGTERMException:
        # Preempted: SaveOnSigterm wrote last.ckpt at a step boundary; exit cleanly.
        log.warning("stopped by SIGTERM: resume with resume_from_checkpoint=%s", cfg.output_dir)
    finally:
        finish_trackers(run.trainer)
    metrics = {name: float(value) for name, value in run.trainer.callback_metrics.items()}
    log.info("final metrics: %s", metrics)
    return metrics
