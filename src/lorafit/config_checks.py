"""Checks on a composed config that must fail before anything is loaded."""

from __future__ import annotations

import re

from omegaconf import DictConfig, OmegaConf

from lorafit.errors import LorafitError
from lorafit.packing import check_backend


class ConfigError(LorafitError, ValueError):
    """A config value that cannot work; the message names the key."""


def devices_count(trainer: DictConfig) -> int:
    """Data-parallel processes the trainer config asks for (1 when it cannot tell yet)."""
    devices = trainer.get("devices", 1)
    if isinstance(devices, int) and devices > 0:
        return devices * int(trainer.get("num_nodes", 1))
    if isinstance(devices, list | tuple):
        return len(devices) * int(trainer.get("num_nodes", 1))
    return 1


def gradient_accumulation(cfg: DictConfig) -> int:
    """batch_size / (micro_batch_size x devices): micro-batches per optimizer step."""
    batch, micro = cfg.data.batch_size, cfg.data.micro_batch_size
    world = devices_count(cfg.trainer)
    if micro < 1 or batch < 1:
        raise ConfigError(
            f"data.batch_size={batch} and data.micro_batch_size={micro} must be at least 1"
        )
    if batch % (micro * world):
        raise ConfigError(
            f"data.batch_size={batch} is not a multiple of data.micro_batch_size={micro}"
            + (f" x {world} devices" if world > 1 else "")
            + "; the optimizer step must be a whole number of micro-batches"
        )
    return batch // (micro * world)


def check_config(cfg: DictConfig) -> int:
    """Validate what can be checked from the config alone; returns the gradient accumulation."""
    # OmegaConf spells list items key[0]; overrides on the command line spell them key.0.
    missing = sorted(re.sub(r"\[(\d+)\]", r".\1", key) for key in OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"set {', '.join(missing)} (e.g. {missing[0]}=...): it has no value")
    if cfg.data.sequence_len < 2:
        raise ConfigError(f"data.sequence_len={cfg.data.sequence_len} must be at least 2")
    if cfg.adapter.get("r", 1) < 1:
        raise ConfigError(f"adapter.r={cfg.adapter.r} must be a positive integer")
    if not 0 <= cfg.adapter.get("dropout", 0) < 1:
        raise ConfigError(f"adapter.dropout={cfg.adapter.dropout} must be in [0, 1)")
    if cfg.data.get("sample_packing"):
        check_backend(cfg.model.attn_implementation)
    if cfg.data.get("overlong", "truncate") not in ("truncate", "drop"):
        raise ConfigError(f"data.overlong={cfg.data.overlong!r}: use truncate or drop")
    return gradient_accumulation(cfg)
