"""Resuming a run: find the checkpoint, and refuse one that belongs to a different job.

A checkpoint records a fingerprint of what its weights and data position mean: the model
source, the adapter's shape, the data's content and the settings that shape it. Resuming
under a config that changes any of these would continue a different run; it is refused with
the differences named, unless `resume_force=true`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lorafit.constants import FINGERPRINT_KEY
from lorafit.errors import ConfigError
from lorafit.runs.checkpoints import read_checkpoint
from lorafit.runs.locate import RUNS, locate

ADAPTER_SHAPE = ("_target_", "r", "alpha", "target_linear", "target_modules", "quantization")
DATA_SHAPE = (
    "sequence_len", "sample_packing", "train_on_inputs", "val_set_size", "seed", "overlong",
    "chat_template",
)  # fmt: skip


def checkpoint_path(value: str | None, runs: Path = RUNS) -> Path | None:
    """`resume_from_checkpoint`: a .ckpt file, a run folder (its checkpoints/last.ckpt), or
    `last` (the newest run's); None when not resuming."""
    return locate(value, "resume_from_checkpoint", prefer="lightning", runs=runs).path


def fingerprint(cfg: DictConfig, rows: Any) -> dict[str, Any]:
    """What a checkpoint's weights and data position depend on."""
    adapter = OmegaConf.to_container(cfg.adapter, resolve=True)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    content = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "model": json.dumps(OmegaConf.to_container(cfg.model.source, resolve=True), sort_keys=True),
        "model.special_tokens": json.dumps(
            OmegaConf.to_container(cfg.model, resolve=True).get("special_tokens") or {},
            sort_keys=True,
        ),
        **{f"adapter.{k}": json.dumps(adapter.get(k), sort_keys=True) for k in ADAPTER_SHAPE},
        **{f"data.{k}": json.dumps(data.get(k)) for k in DATA_SHAPE},
        "data.content": content,
    }


def check_matches(path: Path, current: dict[str, Any], force: bool) -> None:
    """Raise ConfigError naming every difference between the checkpoint's run and this one."""
    saved = read_checkpoint(path, "resume_from_checkpoint").get(FINGERPRINT_KEY)
    if saved is None or force:
        return
    differences = [
        f"{key}: checkpoint {saved.get(key)} != now {current.get(key)}"
        # A key the checkpoint lacks was not yet recorded when it was written.
        for key in sorted(saved)
        if saved.get(key) != current.get(key)
    ]
    if differences:
        raise ConfigError(
            f"resume_from_checkpoint={path} belongs to a different run ("
            + "; ".join(differences)
            + "). Restore those settings, start fresh (adapter.lora_model_dir=<run>/adapter "
            "continues from its weights at step 0), or set resume_force=true"
        )
