"""Turn an Axolotl-style YAML config into a lorafit experiment.

    python -m lorafit.from_axolotl examples/axolotl-qlora-mistral-7b.yml --name my_qlora
    python train.py experiment=my_qlora

Every key is read or refused: an unknown key is an error naming it and the closest known one
(Axolotl itself drops unknown keys silently), and a known key lorafit does not support is an
error that says so. Nothing is written unless the whole file converts.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lorafit.errors import ConfigError, exit_on_user_errors

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Axolotl key -> lorafit key for values that carry over as they are.
SCALARS = {
    "val_set_size": "data.val_set_size",
    "sequence_len": "data.sequence_len",
    "sample_packing": "data.sample_packing",
    "pad_to_sequence_len": "data.pad_to_sequence_len",
    "train_on_inputs": "data.train_on_inputs",
    "micro_batch_size": "data.micro_batch_size",
    "lora_r": "adapter.r",
    "lora_alpha": "adapter.alpha",
    "lora_dropout": "adapter.dropout",
    "lora_target_linear": "adapter.target_linear",
    "lora_target_modules": "adapter.target_modules",
    "lora_fan_in_fan_out": "adapter.fan_in_fan_out",
    "lora_model_dir": "adapter.lora_model_dir",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "learning_rate": "optimizer.lr",
    "weight_decay": "optimizer.weight_decay",
    "num_epochs": "trainer.max_epochs",
    "max_steps": "trainer.max_steps",
    "max_grad_norm": "trainer.gradient_clip_val",
    "logging_steps": "trainer.log_every_n_steps",
    "save_total_limit": "callbacks.model_checkpoint.save_top_k",
    "warmup_steps": "scheduler.warmup_steps",
    "resume_from_checkpoint": "resume_from_checkpoint",
    "seed": "seed",
}
# Keys read for their meaning elsewhere (see `convert`), or that need nothing here.
HANDLED = {
    "base_model", "model_type", "tokenizer_type", "load_in_8bit", "load_in_4bit", "strict",
    "adapter", "datasets", "dataset_prepared_path", "output_dir", "batch_size",
    "gradient_accumulation_steps", "optimizer", "lr_scheduler", "save_interval", "save_steps",
    "bf16", "fp16", "tf32", "wandb_project", "wandb_entity", "wandb_watch", "wandb_log_model",
}  # fmt: skip
# Keys users bring that lorafit knows of but does not support yet, with what to do instead.
UNSUPPORTED = {
    "chat_template": "chat data is not supported yet; use alpaca rows",
    "special_tokens": "adding special tokens is not supported yet",
    "evals_per_epoch": "set trainer.val_check_interval in the experiment instead",
    "saves_per_epoch": "set callbacks.model_checkpoint.every_n_train_steps instead",
    "eval_steps": "set trainer.val_check_interval in the experiment instead",
    "early_stopping_patience": "early stopping is not supported yet",
    "warmup_ratio": "use warmup_steps",
}
# Hub presets lorafit has a model option for.
MODEL_PRESETS = {"mistralai/Mistral-7B-v0.1": "mistral_7b"}
DATA_PRESETS = {"mhenrichsen/alpaca_2k_test": "alpaca_2k"}
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw", "sgd")
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant"}


def _refuse_unknown(source: dict[str, Any], name: str) -> None:
    known = sorted({*SCALARS, *HANDLED, *UNSUPPORTED})
    for key in source:
        if key in UNSUPPORTED:
            raise ConfigError(f"{name}: {key} is not supported by lorafit: {UNSUPPORTED[key]}")
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise ConfigError(f"{name}: unknown key {key!r}{hint}")


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _choose(
    source: dict, key: str, options: dict | tuple, name: str, default: str | None = None
) -> str | None:
    value = source.get(key, default)
    if value is None:
        return None
    if value not in options:
        choices = ", ".join(options)
        raise ConfigError(f"{name}: {key}={value!r} is not supported (lorafit has: {choices})")
    return options[value] if isinstance(options, dict) else value


def convert(source: dict[str, Any], name: str = "config") -> tuple[list[str], dict[str, Any]]:
    """The experiment's defaults-list overrides and its values, from an Axolotl config."""
    if not isinstance(source, dict):
        raise ConfigError(f"{name}: not a YAML mapping of keys")
    _refuse_unknown(source, name)
    groups: list[str] = []
    values: dict[str, Any] = {}
    check: Callable[[bool, str], None] = _require(name)

    base = source.get("base_model")
    check(isinstance(base, str) and base != "", "base_model is required")
    if base in MODEL_PRESETS:
        groups.append(f"override /model: {MODEL_PRESETS[base]}")
    else:
        groups.append("override /model: mistral_7b")
        _set(values, "model.source.repo_id", base)
    four, eight = bool(source.get("load_in_4bit")), bool(source.get("load_in_8bit"))
    check(not (four and eight), "load_in_4bit and load_in_8bit cannot both be true")
    kind = source.get("adapter", "qlora" if four else "lora")
    check(kind in ("lora", "qlora"), f"adapter={kind!r}: lorafit trains lora or qlora")
    check(not (kind == "qlora" and eight), "adapter: qlora needs load_in_4bit, not load_in_8bit")
    adapter = "qlora" if kind == "qlora" or four else "lora_8bit" if eight else "lora"
    groups.append(f"override /adapter: {adapter}")

    datasets = source.get("datasets") or []
    check(isinstance(datasets, list) and len(datasets) == 1, "datasets: give exactly one source")
    dataset = datasets[0]
    check(isinstance(dataset, dict) and "path" in dataset, "datasets.0 needs a path")
    check(dataset.get("type", "alpaca") == "alpaca", "datasets.0.type: lorafit reads alpaca rows")
    if dataset["path"] in DATA_PRESETS:
        groups.append(f"override /data: {DATA_PRESETS[dataset['path']]}")
    else:
        groups.append("override /data: local")
        _set(values, "data.datasets", [{"path": dataset["path"], "type": "alpaca"}])
    if source.get("dataset_prepared_path"):
        # lorafit's cache is keyed by content, so one folder serves every run.
        _set(values, "data.dataset_prepared_path", "outputs/prepared")
    groups.append(f"override /optimizer: {_choose(source, 'optimizer', OPTIMIZERS, name, 'adamw')}")
    groups.append(
        f"override /scheduler: {_choose(source, 'lr_scheduler', SCHEDULERS, name, 'cosine')}"
    )
    precision_gpu = source.get("bf16", True) is not False
    check(not source.get("fp16"), "fp16: lorafit trains in bf16 or fp32")
    groups.append(f"override /trainer: {'gpu' if precision_gpu else 'cpu'}")

    for key, where in SCALARS.items():
        if key in source:
            value = source[key]
            if key == "lora_fan_in_fan_out" and value is None:
                value = False  # empty there means false
            _set(values, where, value)
    micro = source.get("micro_batch_size", 1)
    if "gradient_accumulation_steps" in source:
        _set(values, "data.batch_size", micro * source["gradient_accumulation_steps"])
    elif "batch_size" in source:
        _set(values, "data.batch_size", source["batch_size"])
    if "save_interval" in source or "save_steps" in source:
        model_checkpoint = values.setdefault("callbacks", {}).setdefault("model_checkpoint", {})
        if "save_steps" in source:
            model_checkpoint.update(every_n_train_steps=source["save_steps"])
        else:  # Axolotl's save_interval counts epochs
            model_checkpoint.update(
                every_n_train_steps=None, every_n_epochs=source["save_interval"]
            )
    if source.get("wandb_project"):
        groups.append("override /logger: wandb")
        _set(values, "logger.wandb.project", source["wandb_project"])
        _set(values, "logger.wandb.entity", source.get("wandb_entity"))
        watch = source.get("wandb_watch")
        _set(values, "logger.wandb.watch", watch if watch not in (False, None, "false") else None)
        _set(values, "logger.wandb.log_adapter", bool(source.get("wandb_log_model")))
    return groups, values


def _require(name: str) -> Callable[[bool, str], None]:
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"{name}: {message}")

    return check


def write_experiment(config_file: Path, experiment: str, conf_dir: Path = CONF_DIR) -> Path:
    """Convert `config_file` and write conf/experiment/<experiment>.yaml; returns its path."""
    try:
        source = yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{config_file}: not a readable YAML file ({error})") from error
    groups, values = convert(source, str(config_file))
    out = conf_dir / "experiment" / f"{experiment}.yaml"
    header = (
        "# @package _global_\n"
        f"# Converted from {config_file} by lorafit.from_axolotl.\n"
        f"#   python train.py experiment={experiment}\n"
    )
    # Each "override /group: option" is one mapping entry of the defaults list.
    defaults = [dict([entry.split(": ", 1)]) for entry in groups]
    body = yaml.safe_dump({"defaults": defaults, **values}, sort_keys=False)
    out.write_text(header + body)
    return out


@exit_on_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert an Axolotl-style config.")
    parser.add_argument("config", type=Path, help="the Axolotl-style YAML file")
    parser.add_argument("--name", required=True, help="the experiment name to write")
    parser.add_argument("--conf-dir", type=Path, default=CONF_DIR)
    args = parser.parse_args(argv)
    out = write_experiment(args.config, args.name, args.conf_dir)
    print(f"wrote {out}: python train.py experiment={args.name}")


if __name__ == "__main__":
    main()
