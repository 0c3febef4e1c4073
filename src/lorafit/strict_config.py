"""An unknown config key is an error that suggests the key meant, before anything runs.

Hydra already refuses keys that are not in the config; this adds the nearest valid names
("did you mean adapter.r?"), including the Axolotl-style names of the source config
(`lora_r`, `learning_rate`, ...).
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig

# The article's (Axolotl-style) names, and where they live here.
ALIASES = {
    "lora_r": "adapter.r",
    "lora_alpha": "adapter.alpha",
    "lora_dropout": "adapter.dropout",
    "lora_target_linear": "adapter.target_linear",
    "lora_target_modules": "adapter.target_modules",
    "lora_fan_in_fan_out": "adapter.fan_in_fan_out",
    "lora_model_dir": "adapter.lora_model_dir",
    "learning_rate": "optimizer.lr",
    "lr": "optimizer.lr",
    "num_epochs": "trainer.max_epochs",
    "max_grad_norm": "trainer.gradient_clip_val",
    "logging_steps": "trainer.log_every_n_steps",
    "save_total_limit": "callbacks.model_checkpoint.save_top_k",
    "save_interval": "callbacks.model_checkpoint.every_n_train_steps",
    "val_set_size": "data.val_set_size",
    "sequence_len": "data.sequence_len",
    "sample_packing": "data.sample_packing",
    "micro_batch_size": "data.micro_batch_size",
    "batch_size": "data.batch_size",
    "gradient_checkpointing": "model.gradient_checkpointing",
}
SWEEP_SYNTAX = re.compile(r",|\b(range|choice|interval|glob|tag)\(")


def _leaf_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items_ex(resolve=False):
        full = f"{prefix}{key}"
        keys += _leaf_keys(value, full + ".") if isinstance(value, DictConfig) else [full]
    return keys


def suggestions(unknown: str, valid: Sequence[str]) -> list[str]:
    """The valid keys closest to `unknown`: aliases, then similar full names and leaf names."""
    leaf = unknown.rsplit(".", 1)[-1]
    found = [ALIASES[leaf]] if leaf in ALIASES else []
    found += difflib.get_close_matches(unknown, valid, n=3, cutoff=0.75)
    by_leaf: dict[str, list[str]] = {}
    for key in valid:
        by_leaf.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    for close in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.75):
        found += by_leaf[close]
    return list(dict.fromkeys(found))[:3]


def unknown_key_error(
    overrides: Sequence[str], config_dir: Path, config_name: str = "train"
) -> str | None:
    """One line naming an override's unknown key and the closest valid ones, or None."""
    if any(SWEEP_SYNTAX.search(o.split("=", 1)[-1]) for o in overrides if "=" in o):
        return None  # sweeps are expanded by Hydra itself, which still refuses unknown keys
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        try:
            compose(config_name, overrides=list(overrides))
            return None
        except ConfigCompositionException as error:
            match = re.search(r"Could not override '([^']+)'", str(error))
            if match is None:
                return None  # not an unknown key: Hydra's own message says what is wrong
            unknown = match.group(1)
            others = [o for o in overrides if not o.lstrip("+~").startswith(unknown + "=")]
            valid = _leaf_keys(compose(config_name, overrides=others))
    near = suggestions(unknown, valid)
    hint = f"; did you mean {' or '.join(near)}?" if near else ""
    return f"unknown config key {unknown!r}{hint} (add a new key with +{unknown}=...)"


def exit_on_unknown_keys(config_dir: Path, argv: Sequence[str] | None = None) -> None:
    """For entry points: stop with the suggestion before Hydra starts the run."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith("-") for a in arguments):
        return  # --help, --cfg, -m ...: Hydra's own modes
    overrides = [a for a in arguments if "=" in a and not a.lstrip("+~").startswith("hydra.")]
    message = unknown_key_error(overrides, config_dir)
    if message:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
