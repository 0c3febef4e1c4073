"""Checks on a composed config that must fail before anything is loaded."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig, OmegaConf

from lorafit.constants import ATTENTION_BACKENDS
from lorafit.data.chat import check_setting as check_chat_template
from lorafit.data.packing import check_backend
from lorafit.data.rows import check_source_settings
from lorafit.data.tokenization import OVERLONG_POLICIES
from lorafit.errors import ConfigError, DataError
from lorafit.folders import check_folder
from lorafit.model.dequantize import DEQUANTIZERS
from lorafit.model.liger import check_liger
from lorafit.model.schedules import check_warmup


def trains_on_gpu(trainer: DictConfig) -> bool:
    """Whether Lightning will put this trainer config on CUDA: asked for, or `auto` with a
    GPU present."""
    accelerator = trainer.get("accelerator", "auto")
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def devices_count(trainer: DictConfig) -> int:
    """Data-parallel processes the trainer config asks for on this machine: `auto` and -1
    count the GPUs Lightning would take (a CPU run is one process)."""
    devices = trainer.get("devices", 1)
    nodes = int(trainer.get("num_nodes", 1))
    if devices == "auto" or devices == -1:
        return max(torch.cuda.device_count(), 1) * nodes if trains_on_gpu(trainer) else nodes
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if isinstance(devices, list | tuple) or OmegaConf.is_list(devices):
        return len(devices) * nodes
    if isinstance(devices, str):
        text = devices.strip()
        if text.isdigit():
            return int(text) * nodes
        return len([d for d in text.split(",") if d.strip()]) * nodes
    return nodes


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
# torch.compile's modes (`model.compile_mode`); null is its default.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# The modes that replay compiled code as CUDA graphs. Each decoder layer's modules are compiled
# apart and share their code, so a graph is replayed once a layer while backward still holds
# what an earlier replay wrote: on an H200 (torch 2.11) training stopped in the first backward,
# reading outputs a later replay had overwritten.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# What `model.compile` compiles (`model.compile_scope`): a layer's modules apart, or each
# decoder layer's forward whole.
COMPILE_SCOPES = ("modules", "layers")
WANDB_WATCH = ("gradients", "parameters", "all")


def _require(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {expected}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _missing_keys(node: object, prefix: str = "") -> list[str]:
    """Keys left at `???`, spelled as a command line sets them (`data.datasets.0.path`).
    Walks the unresolved config: `${hydra:...}` cannot be resolved before Hydra runs."""
    if isinstance(node, dict):
        children = node.items()
    elif isinstance(node, list):
        children = enumerate(node)
    else:
        return [prefix.rstrip(".")] if node == "???" else []
    return sorted(k for key, value in children for k in _missing_keys(value, f"{prefix}{key}."))


def check_values(cfg: DictConfig) -> None:
    """Types and ranges of the keys whose bad values would fail late or silently."""
    missing = _missing_keys(OmegaConf.to_container(cfg, resolve=False))
    if missing:
        raise ConfigError(f"set {', '.join(missing)} (e.g. {missing[0]}=...): it has no value")
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
        data.get("overlong", "truncate") in OVERLONG_POLICIES,
        "data.overlong",
        data.get("overlong"),
        " or ".join(OVERLONG_POLICIES),
    )
    check_data_sources(data)
    _require(
        _is_number(cfg.optimizer.lr) and math.isfinite(cfg.optimizer.lr) and cfg.optimizer.lr > 0,
        "optimizer.lr",
        cfg.optimizer.lr,
        "a finite number > 0",
    )
    _require(_is_int(cfg.seed), "seed", cfg.seed, "an integer")
    _require(
        _is_int(data.get("num_workers", 0)) and data.get("num_workers", 0) >= 0,
        "data.num_workers",
        data.get("num_workers"),
        "an integer >= 0",
    )
    scheduler = cfg.get("scheduler", {})
    warmup = scheduler.get("warmup_steps", 0)
    _require(_is_int(warmup) and warmup >= 0, "scheduler.warmup_steps", warmup, "an integer >= 0")
    check_warmup(warmup, scheduler.get("warmup_ratio"))
    check_switches(cfg)
    if adapter.get("autocast_outputs", False):
        # Only bitsandbytes' 4-bit layer returns its input's dtype; nn.Linear already returns
        # autocast's, and the 8-bit layer is left as it is: anywhere else it would do nothing.
        four_bit = bool((adapter.get("quantization") or {}).get("load_in_4bit", False))
        _require(
            four_bit,
            "adapter.autocast_outputs",
            True,
            "false unless the base is 4-bit (adapter=qlora)",
        )
    check_trainer(cfg.trainer)
    check_callbacks(cfg.get("callbacks") or {})
    check_early_stopping(cfg)
    check_logger(cfg.get("logger") or {})
    check_eval(cfg)
    _require(model.dtype in DTYPES, "model.dtype", model.dtype, " or ".join(DTYPES))
    every = model.get("checkpoint_every", 1)
    _require(_is_int(every) and every >= 1, "model.checkpoint_every", every, "an integer >= 1")
    mode = model.get("compile_mode")
    modes = " or ".join([*COMPILE_MODES, "null"])
    if mode in CUDA_GRAPH_MODES:
        raise ConfigError(
            f"model.compile_mode={mode!r}: CUDA graphs do not work with lorafit's compiled "
            f"decoder layers (a replay overwrites outputs that backward still needs); use {modes}"
        )
    _require(mode is None or mode in COMPILE_MODES, "model.compile_mode", mode, modes)
    scope = model.get("compile_scope", "modules")
    _require(scope in COMPILE_SCOPES, "model.compile_scope", scope, " or ".join(COMPILE_SCOPES))
    dequantize = model.get("dequantize", "bitsandbytes")
    _require(dequantize in DEQUANTIZERS, "model.dequantize", dequantize, " or ".join(DEQUANTIZERS))
    chunk = model.get("mlp_chunk_tokens")
    _require(
        chunk is None or (_is_int(chunk) and chunk >= 1),
        "model.mlp_chunk_tokens",
        chunk,
        "an integer >= 1 or null",
    )
    reentrant = model.get("reentrant_checkpointing", True)
    _require(
        isinstance(reentrant, bool), "model.reentrant_checkpointing", reentrant, "true or false"
    )
    _require(
        model.attn_implementation in ATTENTION_BACKENDS,
        "model.attn_implementation",
        model.attn_implementation,
        ", ".join(ATTENTION_BACKENDS),
    )


def check_data_sources(data: DictConfig) -> None:
    """The `data.datasets` entries and the chat template setting, before anything loads."""
    try:
        check_source_settings(OmegaConf.to_container(data.datasets, resolve=True))
        check_chat_template(data.get("chat_template", "tokenizer_default"))
    except DataError as error:
        raise ConfigError(str(error)) from error


# Switches that are true or false; "banana" or 3 would silently read as one or the other.
SWITCHES = (
    "model.gradient_checkpointing",
    "model.liger_kernels",
    "model.compile",
    "model.offload_activations",
    "data.sample_packing",
    "data.pad_to_sequence_len",
    "data.train_on_inputs",
    "adapter.target_linear",
    "adapter.fan_in_fan_out",
    "adapter.upcast_unquantized",
    "adapter.autocast_outputs",
    "adapter.fp32_lora_add",
    "validate_before_training",
    "resume_force",
    "eval.do_sample",
    "chat",
)


def check_switches(cfg: DictConfig) -> None:
    for key in SWITCHES:
        value = OmegaConf.select(cfg, key, default=False)
        _require(isinstance(value, bool), key, value, "true or false")


def check_logger(logger: DictConfig) -> None:
    wandb = logger.get("wandb")
    if wandb is not None and wandb.get("watch") is not None:
        watch = wandb.watch
        _require(
            watch in WANDB_WATCH, "logger.wandb.watch", watch, f"{', '.join(WANDB_WATCH)} or null"
        )


def check_eval(cfg: DictConfig) -> None:
    """eval.py, generate.py and export.py settings, refused before a model loads."""
    settings = cfg.get("eval") or {}
    checked = (("max_samples", 0), ("max_new_tokens", 1), ("report_samples", 0), ("batch_size", 1))
    for key, least in checked:
        value = settings.get(key, least)
        _require(_is_int(value) and value >= least, f"eval.{key}", value, f"an integer >= {least}")
    temperature = settings.get("temperature", 1.0)
    _require(
        _is_number(temperature) and math.isfinite(temperature) and temperature > 0,
        "eval.temperature",
        temperature,
        "a finite number > 0",
    )
    export = cfg.get("export") or {}
    if "dtype" in export:
        _require(export.dtype in DTYPES, "export.dtype", export.dtype, " or ".join(DTYPES))
    for key in ("max_kl", "max_loss_delta"):
        value = export.get(key, 0)
        _require(_is_number(value) and value >= 0, f"export.{key}", value, "a number >= 0")


def check_trainer(trainer: DictConfig) -> None:
    """The Trainer values Lightning or torch would reject late, or accept and train nothing."""
    steps, epochs = trainer.get("max_steps", -1), trainer.get("max_epochs")
    _require(
        _is_int(steps) and (steps == -1 or steps > 0),
        "trainer.max_steps",
        steps,
        "an integer > 0, or -1 to let trainer.max_epochs decide (0 would train nothing)",
    )
    _require(
        epochs is None or (_is_int(epochs) and (epochs == -1 or epochs > 0)),
        "trainer.max_epochs",
        epochs,
        "an integer > 0, -1 or null (0 would train nothing)",
    )
    if steps == -1 and (epochs is None or epochs == -1):
        raise ConfigError(
            f"trainer.max_steps={steps} and trainer.max_epochs={epochs}: the run has no end; "
            "set one of them"
        )
    devices = trainer.get("devices", 1)
    _require(
        devices == "auto"
        or (_is_int(devices) and (devices >= 1 or devices == -1))
        or (isinstance(devices, str) and devices.strip() not in ("", "0"))
        or (OmegaConf.is_list(devices) and len(devices) > 0),
        "trainer.devices",
        devices,
        "a count >= 1, -1 (all), auto, or a list of device indices",
    )
    every = trainer.get("log_every_n_steps", 1)
    _require(_is_int(every) and every >= 1, "trainer.log_every_n_steps", every, "an integer >= 1")
    interval = trainer.get("val_check_interval", 1.0)
    _require(
        (_is_int(interval) and interval >= 1)
        or (_is_number(interval) and 0 < interval <= 1)
        or interval is None,
        "trainer.val_check_interval",
        interval,
        "a count of training batches >= 1, or a fraction of an epoch in (0, 1]",
    )
    per_epoch = trainer.get("check_val_every_n_epoch", 1)
    _require(
        per_epoch is None or (_is_int(per_epoch) and per_epoch >= 1),
        "trainer.check_val_every_n_epoch",
        per_epoch,
        "an integer >= 1 or null",
    )
    limit = trainer.get("limit_val_batches", 1.0)
    _require(
        (_is_int(limit) and limit >= 0) or (_is_number(limit) and 0 <= limit <= 1),
        "trainer.limit_val_batches",
        limit,
        "a count >= 0 or a fraction in [0, 1]",
    )
    sanity = trainer.get("num_sanity_val_steps", 0)
    _require(
        _is_int(sanity) and sanity >= -1,
        "trainer.num_sanity_val_steps",
        sanity,
        "an integer >= 0, or -1 for all",
    )
    clip = trainer.get("gradient_clip_val")
    _require(
        clip is None or (_is_number(clip) and math.isfinite(clip) and clip >= 0),
        "trainer.gradient_clip_val",
        clip,
        "a finite number >= 0 or null",
    )


def check_callbacks(callbacks: DictConfig) -> None:
    """Checkpoint intervals and retention, and the loss watchdog's threshold."""
    for name, entry in callbacks.items():
        if entry is None:
            continue
        for key in ("every_n_train_steps", "every_n_epochs"):
            value = entry.get(key)
            _require(
                value is None or (_is_int(value) and value >= 0),
                f"callbacks.{name}.{key}",
                value,
                "an integer >= 0 (0 = never) or null",
            )
        top_k = entry.get("save_top_k")
        _require(
            top_k is None or (_is_int(top_k) and top_k >= -1),
            f"callbacks.{name}.save_top_k",
            top_k,
            "an integer >= -1 (-1 = keep all)",
        )
        check_saves_per_epoch(name, entry)
        max_loss = entry.get("max_loss")
        _require(
            max_loss is None or (_is_number(max_loss) and max_loss > 0),
            f"callbacks.{name}.max_loss",
            max_loss,
            "a number > 0 or null",
        )


def check_saves_per_epoch(name: str, entry: DictConfig) -> None:
    """N saves an epoch replaces the step interval; an epoch interval as well is Lightning's
    refusal, late and less clear."""
    saves = entry.get("saves_per_epoch")
    if saves is None:
        return
    key = f"callbacks.{name}"
    _require(_is_int(saves) and saves >= 1, f"{key}.saves_per_epoch", saves, "an integer >= 1")
    if entry.get("every_n_epochs"):
        raise ConfigError(
            f"{key}.saves_per_epoch={saves} and {key}.every_n_epochs={entry.every_n_epochs} "
            f"both set when to save: keep one ({key}.every_n_epochs=null)"
        )


def check_early_stopping(cfg: DictConfig) -> None:
    """Early stopping on a validation metric needs validation; without it Lightning would stop
    the run with an error after the first epoch."""
    for name, entry in (cfg.get("callbacks") or {}).items():
        if entry is None or not str(entry.get("_target_", "")).endswith("EarlyStopping"):
            continue
        if str(entry.get("monitor", "")).startswith("val/") and cfg.data.val_set_size == 0:
            raise ConfigError(
                f"callbacks.{name} watches {entry.monitor}, but data.val_set_size=0 leaves no "
                "validation data: hold some out or switch it off with "
                f"callbacks.{name}=null"
            )


def check_machine(cfg: DictConfig) -> None:
    """What the config asks of this machine: a GPU when the trainer wants one, and what runs
    only on one."""
    accelerator = cfg.trainer.get("accelerator", "auto")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator}, but torch sees no CUDA device here; train on "
            "the CPU with trainer=cpu (or trainer.accelerator=cpu), or install a CUDA build of "
            "torch on a machine with a GPU"
        )
    if cfg.model.get("liger_kernels"):
        on_gpu = trains_on_gpu(cfg.trainer)
        check_liger("cuda" if on_gpu else "cpu" if accelerator == "auto" else str(accelerator))


def check_config(cfg: DictConfig) -> int:
    """Validate what can be checked from the config alone; returns the gradient accumulation."""
    check_values(cfg)
    check_folder("output_dir", cfg.output_dir)
    check_folder("data.dataset_prepared_path", cfg.data.get("dataset_prepared_path"))
    for name, entry in (cfg.get("callbacks") or {}).items():
        if entry is not None and entry.get("dirpath") is not None:
            check_folder(f"callbacks.{name}.dirpath", entry.dirpath)

    if cfg.data.get("sample_packing"):
        check_backend(cfg.model.attn_implementation)
    return gradient_accumulation(cfg)
