"""Every option of every config group composes, and the article's job composes to its numbers."""

from __future__ import annotations

import pytest
import torch
import yaml
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers import CONF_DIR, compose_config
from lorafit.config_checks import check_config, devices_count
from lorafit.errors import ConfigError
from lorafit.model.adapters import FullFineTune, LoraAdapter
from lorafit.model.module import CausalLMModule, build_module
from lorafit.strict_config import ALIASES

# conf/_base holds what the options of a group share; it is not a group to choose from.
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and not p.name.startswith("_"))
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF_DIR / g).glob("*.yaml"))]
NEEDS_VALUE = {
    ("data", option): ["data.datasets.0.path=rows.jsonl"]
    for option in ("local", "chat", "completion")
}


def test_every_group_has_options():
    assert set(GROUPS) == {
        "adapter",
        "callbacks",
        "data",
        "experiment",
        "hparams_search",
        "logger",
        "model",
        "optimizer",
        "scheduler",
        "trainer",
    }


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_builds(group, option, tmp_path):
    cfg = compose_config([f"{group}={option}", *NEEDS_VALUE.get((group, option), [])], tmp_path)
    check_config(cfg)
    # Build the cheap objects each option feeds; models and trainers are built in run tests.
    assert isinstance(instantiate(cfg.adapter), LoraAdapter | FullFineTune)
    parameter = torch.nn.Parameter(torch.zeros(2))
    if not cfg.optimizer._target_.startswith(("bitsandbytes", "lorafit.model.optimizers")):
        optimizer = instantiate(cfg.optimizer)([parameter])
        instantiate(cfg.scheduler)(optimizer, num_training_steps=10)
    for entry in (cfg.get("callbacks") or {}).values():
        instantiate(entry)
    assert instantiate(cfg.data).batch_size == cfg.data.batch_size


def test_article_job_composes_to_the_article_numbers(tmp_path):
    cfg = compose_config(["adapter=qlora", "data=alpaca_2k"], tmp_path)
    assert cfg.model.source.repo_id == "mistralai/Mistral-7B-v0.1"
    quant = instantiate(cfg.adapter.quantization)
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4"
    assert quant.bnb_4bit_use_double_quant and quant.bnb_4bit_compute_dtype == torch.bfloat16
    adapter = instantiate(cfg.adapter)
    assert (adapter.config.r, adapter.config.lora_alpha, adapter.config.lora_dropout) == (
        32,
        16,
        0.05,
    )
    assert adapter.config.target_modules == "all-linear"
    assert cfg.data.datasets[0].path == "mhenrichsen/alpaca_2k_test"
    assert cfg.data.val_set_size == 0.1
    assert cfg.model.gradient_checkpointing
    assert cfg.optimizer._target_ == "lorafit.model.optimizers.PagedAdamW32bit"
    assert cfg.optimizer.lr == 1e-4 and cfg.trainer.gradient_clip_val == 0.3


def test_article_experiment_pins_the_rest(tmp_path):
    cfg = compose_config(["experiment=mistral7b_qlora_alpaca2k"], tmp_path)
    assert (cfg.data.sequence_len, cfg.data.batch_size, cfg.data.micro_batch_size) == (8192, 1, 1)
    assert cfg.data.sample_packing and cfg.data.pad_to_sequence_len
    assert cfg.trainer.max_epochs == 100
    assert cfg.callbacks.model_checkpoint.save_top_k == 20
    assert check_config(cfg) == 1


@pytest.mark.parametrize(
    "override", ["adapter.lora_rr=8", "data.sequenc_len=10", "trainer.max_step=3", "lr=1"]
)
def test_unknown_keys_are_errors(override, tmp_path):
    with pytest.raises(ConfigCompositionException, match="not in struct|Could not override"):
        compose_config([override], tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.batch_size=6", "data.micro_batch_size=4"], "data.batch_size=6 is not a multiple"),
        (["data.micro_batch_size=0"], "data.micro_batch_size=0"),
        (["adapter.r=0"], "adapter.r=0"),
        (["adapter.dropout=1.0"], "adapter.dropout"),
        (["data.sequence_len=1"], "data.sequence_len"),
    ],
)
def test_bad_values_name_their_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_config(overrides, tmp_path))


def test_a_missing_mandatory_value_names_its_key(tmp_path):
    with pytest.raises(ConfigError, match="data.datasets.0.path"):
        check_config(compose_config(["data=local"], tmp_path))


def test_accumulation_is_batch_over_micro_batch(tmp_path):
    cfg = compose_config(["data.batch_size=16", "data.micro_batch_size=4"], tmp_path)
    assert check_config(cfg) == 4


@pytest.mark.parametrize(
    ("devices", "accelerator", "gpus", "expected"),
    [
        (2, "cpu", 0, 2),
        ("auto", "cpu", 4, 1),
        ("auto", "auto", 0, 1),
        ("auto", "auto", 4, 4),
        (-1, "gpu", 2, 2),
        ("0,1", "gpu", 2, 2),
        ("3", "gpu", 4, 3),
        ([0, 2], "gpu", 4, 2),
    ],
)
def test_the_device_count_is_what_lightning_would_take(
    devices, accelerator, gpus, expected, monkeypatch
):
    # `auto` on a machine with GPUs is several processes: accumulation must divide by them all.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    trainer = OmegaConf.create({"devices": devices, "accelerator": accelerator})
    assert devices_count(trainer) == expected


def test_a_batch_that_does_not_split_over_auto_devices_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    overrides = ["data.batch_size=4", "data.micro_batch_size=4", "trainer.devices=auto"]
    with pytest.raises(ConfigError, match=r"batch_size=4 is not a multiple.* x 2 devices"):
        check_config(compose_config([*overrides, "trainer.accelerator=auto"], tmp_path))


def test_the_lightning_module_is_the_class_model_module_names(tmp_path):
    cfg = compose_config(["experiment=tiny"], tmp_path)
    module = build_module(cfg, fingerprint={"model": "x"})
    assert type(module) is CausalLMModule and module.fingerprint == {"model": "x"}
    assert "module" not in module.hparams.model  # the class is not a setting of the model
    assert set(module.hparams) == {"model", "adapter", "optimizer", "scheduler"}
    OmegaConf.set_struct(cfg, False)
    cfg.model.module._target_ = "tests.helpers.NoSuchModule"
    with pytest.raises(ConfigError, match="model.module"):
        build_module(cfg)
    del cfg.model.module  # a run config written before the key existed
    assert type(build_module(cfg)) is CausalLMModule


EXAMPLE = CONF_DIR.parent / "examples" / "axolotl-qlora-mistral-7b.yml"


def test_the_example_axolotl_config_holds_the_canonical_jobs_numbers(tmp_path):
    example = yaml.safe_load(EXAMPLE.read_text())
    cfg = compose_config(["experiment=mistral7b_qlora_alpaca2k"], tmp_path)
    compared = []
    for key, where in ALIASES.items():
        # save_interval counts epochs in the example; lorafit's alias is its step interval.
        if example.get(key) is None or key == "save_interval":
            continue
        assert OmegaConf.select(cfg, where) == example[key], key
        compared.append(key)
    assert len(compared) >= 15
    assert cfg.model.source.repo_id == example["base_model"]
    assert cfg.data.datasets[0].path == example["datasets"][0]["path"]
    assert cfg.callbacks.model_checkpoint.every_n_epochs == example["save_interval"]
    assert cfg.optimizer._target_.endswith("PagedAdamW32bit")
    # Plain `python train.py` is the same job, but for what the experiment pins.
    plain = compose_config([], tmp_path)
    assert (plain.adapter.r, plain.data.sample_packing, plain.model.source.repo_id) == (
        example["lora_r"],
        example["sample_packing"],
        example["base_model"],
    )
    assert instantiate(plain.adapter.quantization).load_in_4bit
