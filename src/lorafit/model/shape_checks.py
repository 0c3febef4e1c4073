"""Checks of the config against the model's shape, before any weight is loaded.

The shape comes from the model's config alone, built on the meta device (no memory, no
weights), so a misnamed LoRA target or a sequence longer than the model's positions is one
clear error instead of a failure after minutes of loading.
"""

from __future__ import annotations

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM

from lorafit.errors import ConfigError, describe


def module_names(config: object) -> tuple[set[str], set[str]]:
    """The last-dot names of every module of a model with this config, and of its linear layers
    but the output head (what peft's "all-linear", the adapter's target_linear, picks)."""
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    names, linear = set(), set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        names.add(leaf)
        if isinstance(module, torch.nn.Linear) and module is not head:
            linear.add(leaf)
    return names, linear


def check_model_fits(cfg: DictConfig) -> None:
    """Refuse LoRA targets the model lacks, a target list `target_linear` would ignore, and a
    sequence longer than the model's positions."""
    try:
        config = instantiate(cfg.model.source).load_config()
    except (InstantiationException, ValueError, TypeError) as error:
        raise ConfigError.refused("model.source", error) from error
    positions = getattr(config, "max_position_embeddings", None)
    if positions and cfg.data.sequence_len > positions:
        raise ConfigError(
            f"data.sequence_len={cfg.data.sequence_len} is longer than the model's "
            f"max_position_embeddings={positions}; set data.sequence_len={positions} or less"
        )
    adapter = cfg.adapter
    if "target_modules" not in adapter:
        return  # a full fine-tune
    targets = list(adapter.target_modules or [])
    if not adapter.target_linear and not targets:
        raise ConfigError(
            "adapter.target_modules is empty and adapter.target_linear is false: nothing would "
            "be adapted; name the modules or set adapter.target_linear=true"
        )
    try:
        names, linear = module_names(config)
    except Exception as error:  # noqa: BLE001 - a config that cannot build fails many ways
        raise ConfigError(
            f"model: its config does not build a model ({describe(error)})"
        ) from error
    shown = ", ".join(sorted(linear))
    if adapter.target_linear:
        if targets and set(targets) != linear:
            raise ConfigError(
                f"adapter.target_modules={targets} would be ignored: adapter.target_linear=true "
                f"adapts every linear layer ({shown}); set adapter.target_linear=false to adapt "
                "only the list, or adapter.target_modules=null"
            )
        return
    missing = sorted(set(targets) - names)
    if missing:
        raise ConfigError(
            f"adapter.target_modules names {missing}, which this model does not have; its "
            f"linear layers are {shown}"
        )
