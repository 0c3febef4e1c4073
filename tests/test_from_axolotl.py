"""An Axolotl-style config becomes a lorafit experiment: the example converts to the canonical
job key for key, and every key it cannot honour is refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping
from omegaconf import OmegaConf

from helpers import CONF_DIR
from lorafit.config_checks import check_values, gradient_accumulation
from lorafit.errors import ConfigError
from lorafit.from_axolotl import convert, main
from lorafit.model.sources import mistral_tokenizer, set_special_tokens

EXAMPLE = CONF_DIR.parent / "examples" / "axolotl-qlora-mistral-7b.yml"


def _resolved(conf_dir, experiment: str) -> dict:
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "output_dir=out"])
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("logger")  # the example names a wandb project; the experiment leaves it to you
    return plain


def test_the_example_converts_to_the_canonical_experiment_key_for_key(tmp_path, capsys):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    main([str(EXAMPLE), "--name", "from_example", "--conf-dir", str(conf)])
    assert "experiment=from_example" in capsys.readouterr().out
    converted, canonical = (
        _resolved(conf, "from_example"),
        _resolved(conf, "mistral7b_qlora_alpaca2k"),
    )
    # The experiment adds lorafit's fastest measured settings, which the example does not name.
    speed = ("compile", "offload_activations")
    assert [canonical["model"].pop(key) for key in speed] == [True, True]
    assert [converted["model"].pop(key) for key in speed] == [False, False]
    assert converted == canonical
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        logger = compose("train", overrides=["experiment=from_example"]).logger
    assert (logger.wandb.project, logger.wandb.log_adapter) == ("lorafit", True)


@pytest.mark.parametrize(
    ("change", "model"),
    [
        ({}, {"gradient_checkpointing": True}),
        ({"gradient_checkpointing": False}, {"gradient_checkpointing": False}),
        (
            {"gradient_checkpointing": "offload", "torch_compile": True},
            {"gradient_checkpointing": True, "offload_activations": True, "compile": True},
        ),
        ({"torch_compile": False}, {"gradient_checkpointing": True, "compile": False}),
    ],
)
def test_checkpointing_offload_and_compile_carry_over(change, model):
    _, values = convert({**yaml.safe_load(EXAMPLE.read_text()), **change}, "article.yml")
    assert values["model"] == model


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gradient_checkpointing": "offload_disk"}, r"gradient_checkpointing='offload_disk'"),
        ({"torch_compile": "auto"}, r"torch_compile='auto': expected true or false"),
        ({"lora_rr": 8}, r"unknown key 'lora_rr'; did you mean lora_r\?"),
        ({"tokens": ["<|im_start|>"]}, r"tokens is not supported by lorafit: adding new tokens"),
        ({"load_in_8bit": True}, r"cannot both be true"),
        ({"datasets": [{"path": "x.jsonl", "type": "input_output"}]}, r"datasets\[0\]\.type"),
        ({"optimizer": "lion"}, r"optimizer='lion' is not supported"),
    ],
)
def test_what_cannot_be_honoured_is_named(change, message):
    source = {**yaml.safe_load(EXAMPLE.read_text()), **change}
    with pytest.raises(ConfigError, match=message):
        convert(source, "article.yml")


def test_gradient_accumulation_and_local_data_carry_over():
    source = {
        "base_model": "mistralai/Mistral-7B-v0.1",
        "datasets": [{"path": "rows.jsonl", "type": "alpaca"}],
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 4,
        "save_steps": 50,
    }
    groups, values = convert(source)
    assert "override /data: local" in groups and "override /adapter: lora" in groups
    assert (
        values["data"]["batch_size"] == 8 and values["data"]["datasets"][0]["path"] == "rows.jsonl"
    )
    assert values["callbacks"]["model_checkpoint"] == {"every_n_train_steps": 50}


# --- The keys mapped onto lorafit settings: each converted experiment composes with Hydra and
# passes lorafit's own config checks with the expected values.

BASE = {"base_model": "mistralai/Mistral-7B-v0.1", "datasets": [{"path": "rows.jsonl"}]}


@pytest.fixture(scope="module")
def conf_dir(tmp_path_factory):
    conf = tmp_path_factory.mktemp("axolotl") / "conf"
    shutil.copytree(CONF_DIR, conf)
    return conf


def _converted(conf_dir, tmp_path, change: dict):
    """The config `python train.py experiment=<converted>` composes, checked by lorafit."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = tmp_path / "axolotl.yml"
    source.write_text(yaml.safe_dump({**BASE, **change}))
    experiment = f"converted_{tmp_path.name}"
    main([str(source), "--name", experiment, "--conf-dir", str(conf_dir)])
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "output_dir=out"])
    check_values(cfg)
    return cfg


def _refused(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        convert({**BASE, **change}, "a.yml")


def test_warmup_ratio_becomes_the_schedules_ratio_and_the_lr_follows_it(conf_dir, tmp_path):
    cfg = _converted(conf_dir, tmp_path, {"warmup_ratio": 0.05, "lr_scheduler": "linear"})
    assert (cfg.scheduler.warmup_ratio, cfg.scheduler.warmup_steps) == (0.05, 0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = instantiate(cfg.scheduler)(optimizer, num_training_steps=100)
    factors = [schedule.get_last_lr()[0]]
    for _ in range(6):
        optimizer.step()
        schedule.step()
        factors.append(schedule.get_last_lr()[0])
    # ceil(0.05 x 100) = 5 warmup steps, then the linear decay.
    assert factors == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0, 94 / 95])


def test_warmup_ratio_with_warmup_steps_is_refused():
    _refused({"warmup_ratio": 0.1, "warmup_steps": 10}, r"warmup_steps and warmup_ratio both")
    _refused({"warmup_ratio": 2}, r"warmup_ratio=2: expected a number in \[0, 1\]")


def test_evals_per_epoch_becomes_a_fraction_of_the_epoch(conf_dir, tmp_path):
    cfg = _converted(conf_dir, tmp_path, {"evals_per_epoch": 4})
    assert cfg.trainer.val_check_interval == 0.25


@pytest.mark.parametrize(
    ("batching", "micro_batches"),
    [
        ({"micro_batch_size": 2, "gradient_accumulation_steps": 4}, 80),
        ({"micro_batch_size": 2, "batch_size": 6}, 60),
        ({}, 20),  # Axolotl's defaults: micro-batches of 1, no accumulation; pinned so
    ],
)
def test_eval_steps_counts_micro_batches_of_the_optimizer_step(
    conf_dir, tmp_path, batching, micro_batches
):
    cfg = _converted(conf_dir, tmp_path, {"eval_steps": 20, **batching})
    assert cfg.trainer.val_check_interval == micro_batches
    assert micro_batches == 20 * gradient_accumulation(cfg)  # as lorafit will accumulate


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"evals_per_epoch": 2, "eval_steps": 50}, r"evals_per_epoch and eval_steps both"),
        ({"eval_steps": 0.1}, r"eval_steps=0\.1: expected a whole number of optimizer steps"),
        ({"evals_per_epoch": 0}, r"evals_per_epoch=0: expected an integer >= 1"),
    ],
)
def test_validation_intervals_that_cannot_be_honoured_are_refused(change, message):
    _refused(change, message)


def test_saves_per_epoch_becomes_lorafits_option(conf_dir, tmp_path):
    cfg = _converted(conf_dir, tmp_path, {"saves_per_epoch": 4})
    checkpoint = cfg.callbacks.model_checkpoint
    assert (checkpoint.saves_per_epoch, checkpoint.every_n_train_steps) == (4, None)


@pytest.mark.parametrize("other", ["save_steps", "save_interval"])
def test_saves_per_epoch_with_another_save_interval_is_refused(other):
    _refused({"saves_per_epoch": 2, other: 1}, rf"saves_per_epoch and {other} both")


def test_early_stopping_patience_becomes_lightnings_early_stopping(conf_dir, tmp_path):
    cfg = _converted(conf_dir, tmp_path, {"early_stopping_patience": 3, "val_set_size": 0.05})
    callback = instantiate(cfg.callbacks.early_stopping)
    assert isinstance(callback, EarlyStopping)
    assert (callback.monitor, callback.mode, callback.patience) == ("val/loss", "min", 3)
    # Off unless asked for.
    assert _converted(conf_dir, tmp_path / "off", {}).callbacks.early_stopping is None


def test_early_stopping_without_validation_is_refused():
    _refused({"early_stopping_patience": 3, "val_set_size": 0}, r"val_set_size is 0")


def test_special_tokens_of_the_vocabulary_are_set_on_the_tokenizer(conf_dir, tmp_path):
    tokens = {"pad_token": "</s>", "bos_token": "<s>"}
    cfg = _converted(conf_dir, tmp_path, {"special_tokens": tokens})
    assert cfg.model.special_tokens == tokens
    tokenizer = set_special_tokens(mistral_tokenizer(), cfg.model.special_tokens)
    assert tokenizer.pad_token_id == 2


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ({"additional_special_tokens": ["<x>"]}, r"additional_special_tokens: adding new tokens"),
        ({"pad_tokn": "</s>"}, r"unknown key special_tokens\.pad_tokn; did you mean pad_token\?"),
        ({"eos_token": 7}, r"special_tokens\.eos_token=7: expected a token"),
    ],
)
def test_special_tokens_that_cannot_be_honoured_are_refused(tokens, message):
    _refused({"special_tokens": tokens}, message)


@pytest.mark.parametrize(
    ("change", "template"),
    [
        ({"chat_template": "chatml"}, "chatml"),
        ({"chat_template": "tokenizer_default"}, "tokenizer_default"),
        (
            {"chat_template": "jinja", "chat_template_jinja": "{{ messages[0]['content'] }}"},
            "{{ messages[0]['content'] }}",
        ),
    ],
)
def test_chat_template_becomes_the_datas_template(conf_dir, tmp_path, change, template):
    chats = {"datasets": [{"path": "chats.jsonl", "type": "chat_template"}]}
    cfg = _converted(conf_dir, tmp_path, {**chats, **change})
    assert cfg.data.chat_template == template


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"chat_template": "llama3"},
            r"chat_template='llama3' is not supported: lorafit has tokenizer_default, chatml or "
            r"a Jinja template",
        ),
        ({"chat_template": "jinja"}, r"jinja needs chat_template_jinja"),
        (
            {"chat_template": "chatml", "chat_template_jinja": "{{ x }}"},
            r"chat_template_jinja is read with chat_template: jinja",
        ),
    ],
)
def test_chat_templates_lorafit_lacks_are_refused(change, message):
    _refused(change, message)


def test_completion_data_reads_its_column(conf_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(20)))
    datasets = [{"path": str(corpus), "type": "completion", "field": "body"}]
    cfg = _converted(conf_dir, tmp_path, {"datasets": datasets})
    assert OmegaConf.to_container(cfg.data.datasets) == [
        {"path": str(corpus), "type": "completion", "text_field": "body"}
    ]
    assert cfg.data.overlong == "split"  # the completion option: long documents continue
    train, val = instantiate(cfg.data).load_rows()
    assert {row["text"] for row in train + val} == {f"document {i}" for i in range(20)}


def test_completion_without_a_field_keeps_lorafits_default_column():
    _, values = convert({**BASE, "datasets": [{"path": "c.jsonl", "type": "completion"}]})
    assert values["data"]["datasets"] == [{"path": "c.jsonl", "type": "completion"}]


def _conversations(path, role_key: str, content_key: str, field: str):
    rows = [
        {field: [{role_key: "human", content_key: f"q{i}"}, {role_key: "gpt", content_key: "a"}]}
        for i in range(10)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_sharegpt_reads_conversations_of_from_and_value(conf_dir, tmp_path):
    chats = tmp_path / "chats.jsonl"
    _conversations(chats, "from", "value", "conversations")
    change = {"datasets": [{"path": str(chats), "type": "sharegpt"}], "chat_template": "chatml"}
    cfg = _converted(conf_dir, tmp_path, change)
    assert OmegaConf.to_container(cfg.data.datasets) == [
        {"path": str(chats), "type": "chat", "field_messages": "conversations"}
    ]
    assert cfg.data.chat_template == "chatml"
    train, val = instantiate(cfg.data).load_rows()
    assert train[0]["messages"][1] == {"role": "assistant", "content": "a"}


def test_chat_template_data_with_a_from_value_mapping(conf_dir, tmp_path):
    chats = tmp_path / "chats.jsonl"
    _conversations(chats, "from", "value", "dialogue")
    entry = {
        "path": str(chats),
        "type": "chat_template",
        "field_messages": "dialogue",
        "message_property_mappings": {"role": "from", "content": "value"},
        "split": "train",
    }
    cfg = _converted(conf_dir, tmp_path, {"datasets": [entry]})
    assert OmegaConf.to_container(cfg.data.datasets) == [
        {"path": str(chats), "type": "chat", "split": "train", "field_messages": "dialogue"}
    ]
    assert len(instantiate(cfg.data).load_rows()[0]) == 9


def test_mixed_sources_carry_their_keys_over_whole(conf_dir, tmp_path):
    datasets = [
        {"path": "org/instructions", "type": "alpaca", "revision": "abc123", "weight": 3},
        {"path": "org/corpus", "type": "completion", "name": "en", "split": "train", "weight": 1},
    ]
    groups, _ = convert({**BASE, "datasets": datasets})
    assert "override /data: local" in groups
    cfg = _converted(conf_dir, tmp_path, {"datasets": datasets})
    assert OmegaConf.to_container(cfg.data.datasets) == datasets


def test_the_hub_preset_with_a_pinned_revision_keeps_the_option_and_the_pin(conf_dir, tmp_path):
    entry = {"path": "mhenrichsen/alpaca_2k_test", "type": "alpaca", "revision": "abc123"}
    groups, values = convert({**BASE, "datasets": [entry]})
    assert "override /data: alpaca_2k" in groups
    cfg = _converted(conf_dir, tmp_path, {"datasets": [entry]})
    assert OmegaConf.to_container(cfg.data.datasets) == [entry]
    assert cfg.data.sequence_len == 2048  # the preset's own settings stay


@pytest.mark.parametrize(
    ("entry", "path"),
    [
        ({"path": "json", "data_files": "rows.jsonl"}, "rows.jsonl"),
        ({"path": "rows.jsonl", "ds_type": "json"}, "rows.jsonl"),
        ({"path": "parquet", "data_files": ["rows.parquet"], "ds_type": "parquet"}, "rows.parquet"),
    ],
)
def test_data_files_and_ds_type_that_only_restate_the_file_are_folded_in(entry, path):
    _, values = convert({**BASE, "datasets": [{**entry, "type": "alpaca"}]})
    assert values["data"]["datasets"] == [{"path": path, "type": "alpaca"}]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"path": "x.jsonl", "feild": "text"},
            r"unknown key datasets\[0\]\.feild; did you mean field\?",
        ),
        (
            {"path": "x.jsonl", "type": "chat_template", "field": "text"},
            r"datasets\[0\]\.field applies to type completion only",
        ),
        (
            {"path": "x.jsonl", "field_messages": "m"},
            r"datasets\[0\]\.field_messages applies to type chat_template or sharegpt only",
        ),
        (
            {"path": "x.jsonl", "type": "chat_template", "roles_to_train": ["gpt"]},
            r"datasets\[0\]\.roles_to_train is not supported",
        ),
        (
            {
                "path": "x.jsonl",
                "type": "chat_template",
                "message_property_mappings": {"role": "speaker", "content": "text"},
            },
            r"datasets\[0\]\.message_property_mappings: messages with speaker / text keys; "
            r"lorafit reads role / content or from / value keys only",
        ),
        (
            {"path": "x.jsonl", "type": "chat_template", "message_field_role": "from"},
            r"datasets\[0\]\.message_field_role: messages with from / content keys",
        ),
        (
            {
                "path": "x.jsonl",
                "type": "chat_template",
                "message_property_mappings": {"role": "role", "tool_calls": "calls"},
            },
            r"datasets\[0\]\.message_property_mappings\.tool_calls: lorafit reads a message's role",
        ),
        (
            {"path": "json", "data_files": ["a.jsonl", "b.jsonl"]},
            r"datasets\[0\]\.data_files: lorafit reads one file a source",
        ),
        (
            {"path": "org/data", "data_files": "train.jsonl"},
            r"datasets\[0\]\.data_files='train\.jsonl' with path='org/data'",
        ),
        ({"path": "rows.jsonl", "ds_type": "parquet"}, r"datasets\[0\]\.ds_type='parquet'"),
        ({"type": "alpaca"}, r"datasets\[0\]\.path is required"),
    ],
)
def test_dataset_entries_that_cannot_be_honoured_are_refused_by_key(entry, message):
    _refused({"datasets": [{"path": "ok.jsonl"}, entry]}, message.replace(r"\[0\]", r"\[1\]"))
