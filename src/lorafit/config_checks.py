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
    if batch % (micro * world):
        raise ConfigError(
            f"data.batch_size={batch} is not a multiple of data.micro_batch_size={micro}"
            + (f" x {world} devices" if world > 1 else "")
            + "; the optimizer step must be a whole number of micro-batches"
        )
    return batch // (micro * world)


DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def _require(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {expected}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_values(cfg: DictConfig) -> None:
    """Types and ranges of the keys whose bad values would fail late or silently."""
    adapter, data, model = cfg.adapter, cfg.data, cfg.model
    if "r" in adapter:
        _require(_is_int(adapter.r) and adapter.r > 0, "adapter.r", adapter.r, "an integer > 0")
        _require(
            _is_number(adapter.alpha) and adapter.alpha > 0,
            "adapter.alpha",
            adapter.alpha,
            "a number > 0",
        )
        _require(
            _is_number(adapter.dropout) and 0 <= adapter.dropout < 1,
            "adapter.dropout",
            adapter.dropout,
            "a number in [0, 1)",
        )
    size = data.val_set_size
    _require(
        (_is_int(size) and size >= 0) or (_is_number(size) and 0 <= size < 1),
        "data.val_set_size",
        size,
        "a fraction in [0, 1) or a whole count of rows",
    )
    _require(
        _is_int(data.sequence_len) and data.sequence_len >= 2,
        "data.sequence_len",
        data.sequence_len,
        "an integer >= 2",
    )
    for key in ("batch_size", "micro_batch_size"):
        _require(_is_int(data[key]) and data[key] >= 1, f"data.{key}", data[key], "an integer >= 1")
    _require(
        data.get("overlong", "truncate") in ("truncate", "drop"),
        "data.overlong",
        data.get("overlong"),
        "truncate or drop",
    )
    _require(
        _is_number(cfg.optimizer.lr) and cfg.optimizer.lr > 0,
        "optimizer.lr",
        cfg.optimizer.lr,
        "a number > 0",
    )
    _require(model.dtype in DTYPES, "model.dtype", model.dtype, " or ".join(DTYPES))
    _require(
        model.attn_implementation in ATTENTION,
        "model.attn_implementation",
        model.attn_implementation,
        ", ".join(ATTENTION),
    )


def check_config(cfg: DictConfig) -> int:
    """Validate what can be checked from the config alone; returns the gradient accumulation."""
    # OmegaConf spells list items key[0]; overrides on the command line spell them key.0.
    missing = sorted(re.sub(r"\[(\d+)\]", r".\1", key) for key in OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"set {', '.join(missing)} (e.g. {missing[0]}=...): it has no value")
    check_values(cfg)
    if cfg.data.get("sample_packing"):
        check_backend(cfg.model.attn_implementation)
    return gradient_accumulation(cfg)
