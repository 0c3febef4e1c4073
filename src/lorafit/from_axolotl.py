"""Turn an Axolotl-style YAML config into a lorafit experiment.

    python -m lorafit.from_axolotl examples/axolotl-qlora-mistral-7b.yml --name my_qlora
    python train.py experiment=my_qlora

Every key is read or refused: an unknown key is an error naming it and the closest known one
(Axolotl itself drops unknown keys silently), and a known key lorafit does not support is an
error that says so. The same holds inside each `datasets` entry (alpaca, completion,
chat_template and sharegpt sources). Nothing is written unless the whole file converts.
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
    "learning_rate": "optimizer.lr",
    "weight_decay": "optimizer.weight_decay",
    "num_epochs": "trainer.max_epochs",
    "max_steps": "trainer.max_steps",
    "max_grad_norm": "trainer.gradient_clip_val",
    "logging_steps": "trainer.log_every_n_steps",
    "save_total_limit": "callbacks.model_checkpoint.save_top_k",
    "warmup_steps": "scheduler.warmup_steps",
    "warmup_ratio": "scheduler.warmup_ratio",
    "saves_per_epoch": "callbacks.model_checkpoint.saves_per_epoch",
    "resume_from_checkpoint": "resume_from_checkpoint",
    "seed": "seed",
}
# Keys read for their meaning elsewhere (see `convert`), or that need nothing here.
HANDLED = {
    "base_model", "model_type", "tokenizer_type", "load_in_8bit", "load_in_4bit", "strict",
    "adapter", "datasets", "dataset_prepared_path", "output_dir", "batch_size",
    "gradient_accumulation_steps", "optimizer", "lr_scheduler", "save_interval", "save_steps",
    "bf16", "fp16", "tf32", "wandb_project", "wandb_entity", "wandb_watch", "wandb_log_model",
    "evals_per_epoch", "eval_steps", "early_stopping_patience", "special_tokens",
    "chat_template", "chat_template_jinja", "gradient_checkpointing", "torch_compile",
}  # fmt: skip
# Keys users bring that lorafit knows of but does not support, with the reason.
UNSUPPORTED = {
    "tokens": "adding new tokens would need resizing the embeddings, which lorafit does not do; "
    "special_tokens can name tokens the vocabulary already has",
}
# Hub presets lorafit has a model option for.
MODEL_PRESETS = {"mistralai/Mistral-7B-v0.1": "mistral_7b"}
DATA_PRESETS = {"mhenrichsen/alpaca_2k_test": "alpaca_2k"}
# Axolotl's dataset types -> lorafit's row types.
DATASET_TYPES = {
    "alpaca": "alpaca",
    "completion": "completion",
    "chat_template": "chat",
    "sharegpt": "chat",  # the legacy form: `conversations` of from / value messages
}
# The keys of a `datasets` entry lorafit reads, by lorafit row type.
DATASET_COMMON_KEYS = (
    "path", "type", "split", "revision", "name", "weight", "data_files", "ds_type",
)  # fmt: skip
MESSAGE_MAPPING_KEYS = ("message_property_mappings", "message_field_role", "message_field_content")
DATASET_KEYS = {
    "alpaca": DATASET_COMMON_KEYS,
    "completion": (*DATASET_COMMON_KEYS, "field"),
    "chat": (*DATASET_COMMON_KEYS, "field_messages", *MESSAGE_MAPPING_KEYS),
}
DATASET_UNSUPPORTED = {
    "roles": "lorafit reads the roles system, user and assistant (human and gpt as user and "
    "assistant); rename the roles in the data",
    "roles_to_train": "lorafit learns the assistant turns (data.train_on_inputs=true: all)",
    "train_on_eos": "lorafit learns the assistant turns as the chat template renders them",
    "chat_template": "set the top-level chat_template instead",
    "conversation": "set the top-level chat_template instead (tokenizer_default, chatml or jinja)",
    "field_human": "lorafit reads human and gpt (or user and assistant) as the roles",
    "field_model": "lorafit reads human and gpt (or user and assistant) as the roles",
    "shards": "lorafit reads the whole split",
    "drop_system_message": "lorafit keeps system messages; remove them from the data",
}
# The message keys lorafit finds by itself: (role, content) pairs.
MESSAGE_KEYS = (("role", "content"), ("from", "value"))
# What `ds_type` says of a local file; lorafit reads the type from the file's extension.
LOCAL_FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# Axolotl's special token slots; its additional_special_tokens adds tokens.
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
CHAT_TEMPLATES = ("tokenizer_default", "chatml")
EARLY_STOPPING = "lightning.pytorch.callbacks.EarlyStopping"
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
    values: dict[str, Any] = {}
    check: Callable[[bool, str], None] = _require(name)

    groups = _model_and_adapter(source, values, check)
    groups.append(f"override /data: {_data(source, values, check)}")
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
    _batch(source, values)
    _speed(source, values, check)
    _warmup(source, values, check)
    _validation(source, values, check)
    _checkpoints(source, values, check)
    _early_stopping(source, values, check)
    _special_tokens(source, values, check)
    _chat_template(source, values, check)
    if source.get("wandb_project"):
        groups.append("override /logger: wandb")
        _set(values, "logger.wandb.project", source["wandb_project"])
        _set(values, "logger.wandb.entity", source.get("wandb_entity"))
        watch = source.get("wandb_watch")
        _set(values, "logger.wandb.watch", watch if watch not in (False, None, "false") else None)
        _set(values, "logger.wandb.log_adapter", bool(source.get("wandb_log_model")))
    return groups, values


def _speed(source: dict, values: dict, check: Callable) -> None:
    """Checkpointing, its offloaded form and torch.compile, as Axolotl spells them."""
    if "gradient_checkpointing" in source:
        form = source["gradient_checkpointing"]
        check(
            form in (True, False, None, "offload"),
            f"gradient_checkpointing={form!r}: lorafit offloads to host memory ('offload'), "
            "not to disk",
        )
        _set(values, "model.gradient_checkpointing", bool(form))
        if form == "offload":
            _set(values, "model.offload_activations", True)
    if "torch_compile" in source:
        compile_ = source["torch_compile"]
        check(
            compile_ in (True, False, None), f"torch_compile={compile_!r}: expected true or false"
        )
        _set(values, "model.compile", bool(compile_))


def _require(name: str) -> Callable[[bool, str], None]:
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"{name}: {message}")

    return check


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _model_and_adapter(source: dict, values: dict, check: Callable) -> list[str]:
    groups = []
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
    return groups


def _data(source: dict, values: dict, check: Callable) -> str:
    """The data option, and `data.datasets` unless the option's own list is the one asked for
    (a list set in the experiment replaces the option's list whole)."""
    entries = source.get("datasets")
    check(isinstance(entries, list) and len(entries) > 0, "datasets: give at least one source")
    datasets = [_dataset(entry, f"datasets[{i}]", check) for i, entry in enumerate(entries)]
    first = datasets[0]
    if len(datasets) == 1 and first["type"] == "alpaca" and first["path"] in DATA_PRESETS:
        extra = {key: value for key, value in first.items() if key not in ("path", "type")}
        if extra not in ({}, {"split": "train"}):  # the preset reads split train of main
            _set(values, "data.datasets", datasets)
        return DATA_PRESETS[first["path"]]
    _set(values, "data.datasets", datasets)
    kinds = {dataset["type"] for dataset in datasets}
    # One kind of rows: that kind's option (completion splits long documents, as Axolotl's
    # completion does); alpaca rows or a mix: the plain option, whose list is replaced.
    return kinds.pop() if kinds in ({"completion"}, {"chat"}) else "local"


def _dataset(entry: object, where: str, check: Callable) -> dict[str, Any]:
    """One `datasets` entry as a lorafit source: {path, type, split?, revision?, name?,
    weight?, text_field?, field_messages?}."""
    check(isinstance(entry, dict), f"{where}: expected a mapping with a path")
    check(isinstance(entry.get("path"), str) and entry["path"] != "", f"{where}.path is required")
    kind = entry.get("type", "alpaca")
    check(
        isinstance(kind, str) and kind in DATASET_TYPES,
        f"{where}.type={kind!r} is not supported (lorafit reads: {', '.join(DATASET_TYPES)})",
    )
    rows = DATASET_TYPES[kind]
    _refuse_unknown_dataset_keys(entry, where, rows, check)
    out = {"path": _dataset_path(entry, where, check), "type": rows}
    carried = ("split", "revision", "name", "weight")
    out.update({key: entry[key] for key in carried if entry.get(key) is not None})
    if entry.get("field") is not None:
        out["text_field"] = entry["field"]
    if rows == "chat":
        _check_message_keys(entry, where, check)
        # Axolotl's sharegpt reads `conversations`; lorafit looks for messages first.
        field = entry.get("field_messages", "conversations" if kind == "sharegpt" else None)
        if field is not None:
            out["field_messages"] = field
    return out


def _refuse_unknown_dataset_keys(entry: dict, where: str, rows: str, check: Callable) -> None:
    every = sorted({*(k for keys in DATASET_KEYS.values() for k in keys), *DATASET_UNSUPPORTED})
    for key in entry:
        at = f"{where}.{key}"
        check(
            key not in DATASET_UNSUPPORTED, f"{at} is not supported: {DATASET_UNSUPPORTED.get(key)}"
        )
        if key in DATASET_KEYS[rows]:
            continue
        types = [name for name, kind in DATASET_TYPES.items() if key in DATASET_KEYS[kind]]
        check(key not in every, f"{at} applies to type {' or '.join(types)} only")
        near = difflib.get_close_matches(str(key), every, n=1, cutoff=0.6)
        check(False, f"unknown key {at}" + (f"; did you mean {near[0]}?" if near else ""))


def _dataset_path(entry: dict, where: str, check: Callable) -> str:
    """The path, with Axolotl's data_files / ds_type folded in where they only restate it."""
    path, files, ds_type = entry["path"], entry.get("data_files"), entry.get("ds_type")
    if files is not None:
        files = [files] if isinstance(files, str) else files
        check(
            isinstance(files, list) and len(files) == 1 and isinstance(files[0], str),
            f"{where}.data_files: lorafit reads one file a source; give each file its own "
            "datasets entry, as its path",
        )
        check(
            path in (files[0], ds_type, *LOCAL_FILE_TYPES.values()),
            f"{where}.data_files={files[0]!r} with path={path!r}: lorafit reads a file given as "
            "the path alone; set path to the file",
        )
        path = files[0]
    if ds_type is not None:
        check(
            ds_type == LOCAL_FILE_TYPES.get(Path(path).suffix.lower()),
            f"{where}.ds_type={ds_type!r}: lorafit reads a local file's type from its extension "
            f"({', '.join(LOCAL_FILE_TYPES)}), and {path!r} does not say {ds_type}",
        )
    return path


def _check_message_keys(entry: dict, where: str, check: Callable) -> None:
    """lorafit finds role / content and from / value messages by itself: a mapping naming one
    of those pairs is accepted, any other is refused."""
    mapping = entry.get("message_property_mappings") or {}
    at = f"{where}.message_property_mappings"
    check(
        isinstance(mapping, dict),
        f"{at}: expected a mapping such as {{role: from, content: value}}",
    )
    for key in mapping:
        check(
            key in ("role", "content"),
            f"{at}.{key}: lorafit reads a message's role and content only",
        )
    role = entry.get("message_field_role") or mapping.get("role", "role")
    content = entry.get("message_field_content") or mapping.get("content", "content")
    given = "/".join(f"{where}.{key}" for key in MESSAGE_MAPPING_KEYS if key in entry)
    pairs = " or ".join(f"{r} / {c}" for r, c in MESSAGE_KEYS)
    check(
        (role, content) in MESSAGE_KEYS,
        f"{given}: messages with {role} / {content} keys; lorafit reads {pairs} keys only "
        "(rename them in the data)",
    )


def _batch(source: dict, values: dict) -> None:
    micro = source.get("micro_batch_size", 1)
    if "gradient_accumulation_steps" in source:
        _set(values, "data.batch_size", micro * source["gradient_accumulation_steps"])
    elif "batch_size" in source:
        _set(values, "data.batch_size", source["batch_size"])


def _warmup(source: dict, values: dict, check: Callable) -> None:
    ratio = source.get("warmup_ratio")
    if ratio is None:
        return
    check(
        isinstance(ratio, int | float) and not isinstance(ratio, bool) and 0 <= ratio <= 1,
        f"warmup_ratio={ratio!r}: expected a number in [0, 1]",
    )
    check(
        not source.get("warmup_steps"),
        "warmup_steps and warmup_ratio both set the warmup: keep one",
    )
    _set(values, "scheduler.warmup_steps", 0)  # lorafit's schedules otherwise warm up 10 steps


def _validation(source: dict, values: dict, check: Callable) -> None:
    """evals_per_epoch / eval_steps -> trainer.val_check_interval: a fraction of an epoch, or a
    count of micro-batches (Lightning counts batches, Axolotl optimizer steps)."""
    per_epoch, steps = source.get("evals_per_epoch"), source.get("eval_steps")
    check(
        per_epoch is None or steps is None,
        "evals_per_epoch and eval_steps both set when to validate: keep one",
    )
    if per_epoch is not None:
        check(_is_count(per_epoch), f"evals_per_epoch={per_epoch!r}: expected an integer >= 1")
        _set(values, "trainer.val_check_interval", 1 / per_epoch)
    elif steps is not None:
        check(
            _is_count(steps),
            f"eval_steps={steps!r}: expected a whole number of optimizer steps >= 1 (or use "
            "evals_per_epoch)",
        )
        _set(values, "trainer.val_check_interval", steps * _accumulation(values, check))


def _accumulation(values: dict, check: Callable) -> int:
    """Micro-batches per optimizer step, pinned in the experiment so that an interval counted
    in micro-batches stays the one asked for (Axolotl's defaults: micro 1, no accumulation)."""
    data = values.setdefault("data", {})
    micro = data.setdefault("micro_batch_size", 1)
    batch = data.setdefault("batch_size", micro)
    check(
        _is_count(micro) and _is_count(batch) and batch % micro == 0,
        f"batch_size={batch!r} is not a multiple of micro_batch_size={micro!r}",
    )
    return batch // micro


def _checkpoints(source: dict, values: dict, check: Callable) -> None:
    steps, epochs = source.get("save_steps"), source.get("save_interval")
    saves = source.get("saves_per_epoch")
    if saves is not None:
        check(_is_count(saves), f"saves_per_epoch={saves!r}: expected an integer >= 1")
        for other in ("save_steps", "save_interval"):
            check(
                source.get(other) is None,
                f"saves_per_epoch and {other} both set when to save: keep one",
            )
        # saves_per_epoch replaces the step interval once the epoch's length is known.
        _set(values, "callbacks.model_checkpoint.every_n_train_steps", None)
    elif "save_interval" in source or "save_steps" in source:
        model_checkpoint = values.setdefault("callbacks", {}).setdefault("model_checkpoint", {})
        if "save_steps" in source:
            model_checkpoint.update(every_n_train_steps=steps)
        else:  # Axolotl's save_interval counts epochs
            model_checkpoint.update(every_n_train_steps=None, every_n_epochs=epochs)


def _early_stopping(source: dict, values: dict, check: Callable) -> None:
    """Lightning's EarlyStopping on val/loss; like Axolotl's, its patience counts validations."""
    patience = source.get("early_stopping_patience")
    if patience is None:
        return
    check(_is_count(patience), f"early_stopping_patience={patience!r}: expected an integer >= 1")
    check(
        source.get("val_set_size") != 0,
        "early_stopping_patience watches the validation loss, but val_set_size is 0",
    )
    callback = {"_target_": EARLY_STOPPING, "monitor": "val/loss", "mode": "min"}
    _set(values, "callbacks.early_stopping", {**callback, "patience": patience})


def _special_tokens(source: dict, values: dict, check: Callable) -> None:
    """Special tokens lorafit sets on the tokenizer; it checks they are in the vocabulary when
    the tokenizer loads, since adding tokens would need resizing the embeddings."""
    tokens = source.get("special_tokens")
    if not tokens:
        return
    check(isinstance(tokens, dict), "special_tokens: expected a mapping such as {pad_token: ...}")
    for key, token in tokens.items():
        at = f"special_tokens.{key}"
        check(
            key != "additional_special_tokens",
            f"{at}: adding new tokens is not supported (it would need resizing the embeddings)",
        )
        near = difflib.get_close_matches(str(key), SPECIAL_TOKENS, n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]}?" if near else ""
        check(key in SPECIAL_TOKENS, f"unknown key {at}{hint}")
        check(isinstance(token, str) and token != "", f"{at}={token!r}: expected a token")
    _set(values, "model.special_tokens", dict(tokens))


def _chat_template(source: dict, values: dict, check: Callable) -> None:
    """chat_template (with chat_template_jinja) -> data.chat_template: a name lorafit has, or
    the Jinja template itself."""
    name, jinja = source.get("chat_template"), source.get("chat_template_jinja")
    if name is None and jinja is None:
        return
    if name in (None, "jinja"):
        check(
            isinstance(jinja, str) and ("{{" in jinja or "{%" in jinja),
            "chat_template: jinja needs chat_template_jinja: <a Jinja chat template>",
        )
        _set(values, "data.chat_template", jinja)
        return
    check(jinja is None, f"chat_template_jinja is read with chat_template: jinja, not {name!r}")
    check(
        name in CHAT_TEMPLATES,
        f"chat_template={name!r} is not supported: lorafit has tokenizer_default, chatml or a "
        "Jinja template (chat_template: jinja with chat_template_jinja)",
    )
    _set(values, "data.chat_template", name)


def write_experiment(config_file: Path, experiment: str, conf_dir: Path = CONF_DIR) -> Path:
    """Convert `config_file` and write conf/experiment/<experiment>.yaml; returns its path."""
    try:
        source = yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{config_file}: not a readable YAML file ({error})") from error
    groups, values = convert(source, str(config_file))
    if not (conf_dir / "experiment").is_dir():
        raise ConfigError(f"--conf-dir {conf_dir}: no experiment/ folder; name lorafit's conf/")
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
