"""What `ckpt=` names, and how its weights get into a freshly built model.

`ckpt` may be a run folder (outputs/runs/...), its `adapter/` folder (peft format), a
Lightning `.ckpt` file, or `none` for the bare base model. Weights load with
`weights_only=True` or from safetensors: nothing in a checkpoint file is executed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from peft import set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors import safe_open

from lorafit.errors import CheckpointError, describe
from lorafit.runs.locate import Checkpoint, locate

# What a run folder's own config supplies to eval unless the command line overrides: the
# trainer too, so validation runs at the precision training used.
RUN_KEYS = ("model", "adapter", "data", "trainer", "seed")


def read_checkpoint(path: Path, key: str) -> dict:
    """A Lightning .ckpt file's contents (tensors only, nothing executed), or a CheckpointError
    naming the file and what is wrong with it: empty, truncated, or not a checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - torch reports damage with many types
        raise CheckpointError(
            f"{key}={path}: not a readable checkpoint ({describe(error)})"
        ) from error
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise CheckpointError(f"{key}={path}: not a Lightning checkpoint (it has no state_dict)")
    return state


def check_adapter_folder(folder: Path, key: str) -> None:
    """Refuse, naming the file, a folder that is not a readable peft LoRA adapter."""
    if not folder.is_dir():
        raise CheckpointError(f"{key}={folder}: no such folder")
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{key}={folder}: no adapter_config.json, not a peft adapter folder")
    try:
        saved = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{config_file}: not valid JSON (line {error.lineno} column {error.colno}: {error.msg})"
        ) from error
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{config_file}: not a text file ({error.reason})") from error
    if not isinstance(saved, dict) or saved.get("peft_type") != "LORA" or "r" not in saved:
        kind = saved.get("peft_type") if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(f"{config_file}: not a LoRA adapter config (peft_type {kind!r})")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{key}={folder}: adapter_model.safetensors is missing")
    try:
        with safe_open(weights, "pt") as handle:
            names = list(handle.keys())
            for name in names:  # reads every tensor: a truncated file fails here, not later
                handle.get_slice(name)[:]
    except Exception as error:  # noqa: BLE001 - safetensors reports damage with many types
        raise CheckpointError(
            f"{weights}: not a readable safetensors file ({describe(error)})"
        ) from error
    if not names:
        raise CheckpointError(f"{weights}: holds no weights")


def resolve(ckpt: str | None, key: str = "ckpt", prefer: str = "adapter") -> Checkpoint:
    """Locate `ckpt` and check that its files can be read, before any model is built;
    raises CheckpointError naming the file and what is wrong with it."""
    checkpoint = locate(ckpt, key, prefer)
    if checkpoint.kind == "lightning":
        read_checkpoint(checkpoint.path, key)
    elif checkpoint.kind == "adapter":
        check_adapter_folder(checkpoint.path, key)
    if checkpoint.run_dir is not None:
        config_file = checkpoint.run_dir / "config.yaml"
        try:
            loaded = OmegaConf.load(config_file)
        except Exception as error:  # noqa: BLE001 - YAML and OmegaConf errors alike
            raise CheckpointError(
                f"{config_file}: not a readable run config ({describe(error)})"
            ) from error
        if not isinstance(loaded, DictConfig) or "model" not in loaded:
            raise CheckpointError(f"{config_file}: not a lorafit run config (no model section)")
    return checkpoint


def chosen_groups(overrides: list[str]) -> set[str]:
    """Top-level sections the command line chooses whole (`data=local`, an experiment)."""
    keys = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    chosen = {key for key in keys if "." not in key}
    if "experiment" in chosen:
        chosen |= {"model", "adapter", "data"}
    return chosen


def merge_run_config(cfg: DictConfig, checkpoint: Checkpoint, overrides: list[str]) -> DictConfig:
    """The composed config with model, adapter, data, trainer, seed and eval settings taken
    from the checkpoint's run, except where the command line chose another (`data=local`)
    or set a key (`data.val_set_size=0`: the run's data with that one change); an adapter
    folder's own shape wins over both."""
    merged = cfg.copy()
    OmegaConf.set_struct(merged, False)
    run = checkpoint.run_config
    if run is not None:
        chosen = chosen_groups(overrides)
        for key in (*RUN_KEYS, "eval"):
            if key in chosen or key not in run:
                continue
            # Eval settings merge key by key (a run keeps its labels, a newer key its default).
            merged[key] = OmegaConf.merge(cfg[key], run[key]) if key == "eval" else run[key]
        for override in overrides:
            key = override.lstrip("+~").split("=", 1)[0]
            if "." in key and key.split(".", 1)[0] not in chosen:
                OmegaConf.update(merged, key, OmegaConf.select(cfg, key), merge=False)
    if checkpoint.kind == "adapter":
        saved = json.loads((checkpoint.path / "adapter_config.json").read_text())
        targets = saved["target_modules"]
        merged.adapter.update(
            r=saved["r"],
            alpha=saved["lora_alpha"],
            target_linear=False,
            target_modules=sorted(targets) if isinstance(targets, list) else [targets],
            fan_in_fan_out=saved.get("fan_in_fan_out", False),
        )
    OmegaConf.set_struct(merged, True)
    return merged


def load_weights(module: torch.nn.Module, checkpoint: Checkpoint) -> None:
    """Put the checkpoint's trained weights into `module` (a configured CausalLMModule)."""
    if checkpoint.kind == "none":
        return  # a fresh LoRA adapter has B = 0: the model is exactly the base
    if checkpoint.kind == "lightning":
        state = read_checkpoint(checkpoint.path, "ckpt")["state_dict"]
        expected = {n: p for n, p in module.named_parameters() if p.requires_grad}
        _check_match(checkpoint, set(state), set(expected))
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise CheckpointError(
                    f"ckpt={checkpoint.path}: {name} has shape {tuple(tensor.shape)}, the model "
                    f"expects {tuple(expected[name].shape)}: the adapter does not fit this base"
                )
        module.load_state_dict(state, strict=False)
        return
    weights = load_peft_weights(str(checkpoint.path), device="cpu")
    try:
        result = set_peft_model_state_dict(module.model, weights)
    except RuntimeError as error:  # size mismatches
        raise CheckpointError(
            f"ckpt={checkpoint.path}: the adapter does not fit this base model: {error}"
        ) from error
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise CheckpointError(
            f"ckpt={checkpoint.path}: the adapter does not fit this base model (unexpected: "
            f"{result.unexpected_keys[:3]}, missing: {missing[:3]})"
        )


def _check_match(checkpoint: Checkpoint, found: set[str], expected: set[str]) -> None:
    if found != expected:
        raise CheckpointError(
            f"ckpt={checkpoint.path}: the adapter does not fit this base model: "
            f"{len(expected - found)} expected weights missing (e.g. "
            f"{sorted(expected - found)[:2]}), {len(found - expected)} unexpected (e.g. "
            f"{sorted(found - expected)[:2]})"
        )
