"""Bad input, table-driven: each case stops with one message naming the key, file, row or
field, before any model weight is loaded, and leaves an existing run folder as it was."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save as safetensors_save

from helpers import CONF_DIR, TINY, compose_config, logged
from lorafit.errors import CheckpointError, LorafitError
from lorafit.eval.evaluation import evaluate
from lorafit.strict_config import config_error
from lorafit.training import train

GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}
CHAT_ROW = {
    "messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
}
COMPLETION = ["data.datasets.0.type=completion"]
CHAT = ["data.datasets.0.type=chat", "data.chat_template=chatml"]

# (case, overrides, data file (name, text) or None, message pattern)
CASES = [
    ("rank zero", ["adapter.r=0"], None, r"adapter\.r=0: expected an integer > 0"),
    ("fractional rank", ["adapter.r=2.5"], None, r"adapter\.r=2\.5"),
    ("dropout of one", ["adapter.dropout=1.0"], None, r"adapter\.dropout=1\.0"),
    ("negative alpha", ["adapter.alpha=-1"], None, r"adapter\.alpha=-1"),
    ("validation share over one", ["data.val_set_size=1.5"], None, r"data\.val_set_size=1\.5"),
    ("sequence of one token", ["data.sequence_len=1"], None, r"data\.sequence_len=1"),
    ("batch not a multiple", ["data.batch_size=6"], None, r"batch_size=6 is not a multiple"),
    ("micro-batch of zero", ["data.micro_batch_size=0"], None, r"data\.micro_batch_size=0"),
    ("learning rate zero", ["optimizer.lr=0"], None, r"optimizer\.lr=0"),
    ("unknown dtype", ["model.dtype=float8"], None, r"model\.dtype='float8'"),
    ("unknown attention", ["model.attn_implementation=banana"], None, r"attn_implementation"),
    (
        "packing that cannot isolate",
        ["data.sample_packing=true", "model.attn_implementation=flex_attention"],
        None,
        r"flex_attention.*cannot isolate",
    ),
    ("unknown overlong policy", ["data.overlong=cut"], None, r"data\.overlong='cut'"),
    ("local data without a path", ["data=local"], None, r"set data\.datasets\.0\.path"),
    (
        "missing resume checkpoint",
        ["resume_from_checkpoint=/nowhere/last.ckpt"],
        None,
        r"resume_from_checkpoint=/nowhere/last\.ckpt",
    ),
    (
        "missing data file",
        ["data=local", "data.datasets.0.path=/nowhere/rows.json"],
        None,
        r"data file not found: /nowhere/rows\.json",
    ),
    (
        "row without output",
        [],
        ("rows.jsonl", [GOOD, {"instruction": "x"}]),
        r"rows\.jsonl: row 1 has no 'output'",
    ),
    (
        "row without instruction",
        [],
        ("rows.jsonl", [GOOD, {"output": "x"}]),
        r"rows\.jsonl: row 1 has no 'instruction'",
    ),
    (
        "output not text",
        [],
        ("rows.jsonl", [GOOD, {**GOOD, "output": 7}]),
        r"row 1 field 'output' is int",
    ),
    ("empty file", [], ("rows.json", ""), r"rows\.json: the data set is empty"),
    ("empty list", [], ("rows.json", []), r"rows\.json: the data set is empty"),
    (
        "unsupported file type",
        [],
        ("rows.txt", "instruction,output\nx,y\n"),
        r"rows\.txt: unsupported file type '\.txt'",
    ),
    ("broken JSON", [], ("rows.json", '[{"instruction": "x", '), r"could not be read as json"),
    (
        "no training rows left",
        ["data.val_set_size=0.9"],
        ("rows.json", [GOOD, GOOD]),
        r"leaves no training rows out of 2",
    ),
    (
        "every example too long",
        ["data.overlong=drop", "data.sequence_len=8"],
        ("rows.json", [GOOD] * 4),
        r"no usable example at sequence_len=8",
    ),
    # Raw text and conversations: each bad shape names its row (and message).
    (
        "completion without its text field",
        COMPLETION,
        ("docs.jsonl", [{"body": "x"}]),
        r"docs\.jsonl: no row has the field 'text' \(fields found: body\)",
    ),
    (
        "completion with empty text",
        COMPLETION,
        ("docs.jsonl", [{"text": "a b"}, {"text": " "}]),
        r"docs\.jsonl: row 1 has an empty 'text'",
    ),
    (
        "completion text not text",
        COMPLETION,
        ("docs.jsonl", [{"text": "a"}, {"text": 3}]),
        r"docs\.jsonl: row 1 field 'text' is int text",
    ),
    (
        "chat without messages",
        CHAT,
        ("chats.jsonl", [{"text": "x"}]),
        r"chats\.jsonl: no row has the field 'messages'",
    ),
    (
        "chat message without content",
        CHAT,
        ("chats.jsonl", [CHAT_ROW, {"messages": [{"role": "user"}]}]),
        r"chats\.jsonl: row 1 message 0 has keys \['role'\]; a message needs role and content",
    ),
    (
        "chat with an unknown role",
        CHAT,
        ("chats.jsonl", [CHAT_ROW, {"messages": [{"role": "bot", "content": "x"}]}]),
        r"chats\.jsonl: row 1 message 0 has the unknown role 'bot'",
    ),
    (
        "chat with an empty reply",
        CHAT,
        (
            "chats.jsonl",
            [
                {
                    "messages": [
                        {"role": "user", "content": "x"},
                        {"role": "assistant", "content": ""},
                    ]
                }
            ],
        ),
        r"chats\.jsonl: row 0 message 1 \(assistant\) has empty content",
    ),
    (
        "chat with no reply to learn",
        CHAT,
        ("chats.jsonl", [CHAT_ROW, {"messages": [{"role": "user", "content": "x"}]}]),
        r"chats\.jsonl: row 1 has no assistant message",
    ),
    (
        "chat messages not a list",
        CHAT,
        ("chats.jsonl", [{"messages": "hello"}]),
        r"chats\.jsonl: row 0 has str messages",
    ),
    (
        "chat template without assistant markers",
        [*CHAT, "data.chat_template='{% for m in messages %}{{ m.content }}{% endfor %}'"],
        ("chats.jsonl", [CHAT_ROW] * 4),
        r"renders an assistant turn exactly like a user turn",
    ),
    (
        "chat on a tokenizer without a template",
        [*CHAT, "data.chat_template=tokenizer_default"],
        ("chats.jsonl", [CHAT_ROW] * 4),
        r"the model's tokenizer has no chat template; set data\.chat_template=chatml",
    ),
    (
        "unknown chat template",
        [*CHAT, "data.chat_template=llama9"],
        None,
        r"data\.chat_template='llama9': expected tokenizer_default, chatml",
    ),
    (
        "unknown source type",
        ["data.datasets.0.type=sharegpt"],
        None,
        r"data\.datasets\.0\.type='sharegpt': expected one of alpaca, completion, chat",
    ),
    (
        "misspelt source key",
        ["+data.datasets.0.wieght=2"],
        None,
        r"data\.datasets\.0\.wieght: unknown key; did you mean weight",
    ),
    (
        "weight of zero",
        ["+data.datasets.0.weight=0"],
        None,
        r"data\.datasets\.0\.weight=0: expected a number > 0",
    ),
    (
        "weights on some sources only",
        ["data.datasets=[{path: builtin:demo_alpaca, weight: 2}, {path: builtin:demo_alpaca}]"],
        None,
        r"data\.datasets\.1\.weight is missing",
    ),
    # Values Lightning or torch would reject late, or accept and train nothing.
    ("max_steps below -1", ["trainer.max_steps=-2"], None, r"trainer\.max_steps=-2"),
    ("max_steps zero", ["trainer.max_steps=0"], None, r"trainer\.max_steps=0.*train nothing"),
    (
        "max_epochs zero",
        ["trainer.max_steps=-1", "trainer.max_epochs=0"],
        None,
        r"trainer\.max_epochs=0.*train nothing",
    ),
    (
        "a run without an end",
        ["trainer.max_steps=-1", "trainer.max_epochs=-1"],
        None,
        r"the run has no end",
    ),
    ("no devices", ["trainer.devices=0"], None, r"trainer\.devices=0"),
    ("logging interval zero", ["trainer.log_every_n_steps=0"], None, r"log_every_n_steps=0"),
    ("validation interval zero", ["trainer.val_check_interval=0"], None, r"val_check_interval=0"),
    (
        "validation fraction over one",
        ["trainer.val_check_interval=1.5"],
        None,
        r"val_check_interval=1\.5",
    ),
    ("negative clipping", ["trainer.gradient_clip_val=-1"], None, r"gradient_clip_val=-1"),
    (
        "negative checkpoint interval",
        ["callbacks.model_checkpoint.every_n_train_steps=-5"],
        None,
        r"callbacks\.model_checkpoint\.every_n_train_steps=-5",
    ),
    (
        "retention below -1",
        ["callbacks.model_checkpoint.save_top_k=-2"],
        None,
        r"callbacks\.model_checkpoint\.save_top_k=-2",
    ),
    (
        "watchdog threshold zero",
        ["callbacks.loss_watchdog.max_loss=0"],
        None,
        r"callbacks\.loss_watchdog\.max_loss=0",
    ),
    ("negative loader workers", ["data.num_workers=-1"], None, r"data\.num_workers=-1"),
    ("seed not a number", ["seed=abc"], None, r"seed='abc': expected an integer"),
    ("fractional seed", ["seed=1.5"], None, r"seed=1\.5: expected an integer"),
    ("infinite learning rate", ["optimizer.lr=inf"], None, r"optimizer\.lr=inf"),
    ("NaN learning rate", ["optimizer.lr=nan"], None, r"optimizer\.lr=nan"),
    ("negative warmup", ["scheduler.warmup_steps=-1"], None, r"scheduler\.warmup_steps=-1"),
    # Checked against the model's shape (its config on the meta device) before any weight.
    (
        "LoRA target the model lacks",
        ["adapter.target_linear=false", "adapter.target_modules=[q_proj,c_attn]"],
        None,
        r"names \['c_attn'\], which this model does not have; its linear layers are down_proj",
    ),
    (
        "target list that target_linear ignores",
        ["adapter.target_modules=[q_proj,v_proj]"],
        None,
        r"target_modules=\['q_proj', 'v_proj'\] would be ignored",
    ),
    (
        "sequence longer than the model's positions",
        ["data.sequence_len=8192"],
        None,
        r"sequence_len=8192 is longer than the model's max_position_embeddings=4096",
    ),
    # Values a constructor refuses (Lightning, torch optimizers, transformers configs): tried on
    # the config or a stand-in before the model loads, and named by their key.
    ("unknown precision", ["trainer.precision=banana"], None, r"trainer: ValueError: Precision"),
    ("negative weight decay", ["optimizer.weight_decay=-1"], None, r"optimizer: .*weight_decay"),
    ("beta over one", ["optimizer.betas=[1.5,0.9]"], None, r"optimizer: .*beta parameter"),
    (
        "negative momentum",
        ["optimizer=sgd", "optimizer.momentum=-1"],
        None,
        r"optimizer: .*momentum",
    ),
    (
        "model of width zero",
        ["model.source.hidden_size=0"],
        None,
        r"model: its config does not build a model",
    ),
    (
        "heads that do not divide the width",
        ["model.source.num_attention_heads=3"],
        None,
        r"model\.source: ",
    ),
    ("sanity steps below -1", ["trainer.num_sanity_val_steps=-5"], None, r"num_sanity_val_steps"),
    ("switch that is not a switch", ["data.sample_packing=banana"], None, r"true or false"),
    ("number as a switch", ["model.gradient_checkpointing=3"], None, r"true or false"),
    (
        "4-bit outputs over a base that is not 4-bit",
        ["adapter.autocast_outputs=true"],
        None,
        r"adapter\.autocast_outputs=True: expected false unless the base is 4-bit",
    ),
    (
        "checkpointing every zeroth layer",
        ["model.gradient_checkpointing=true", "model.checkpoint_every=0"],
        None,
        r"model\.checkpoint_every=0: expected an integer >= 1",
    ),
    (
        "a compile mode torch does not have",
        ["model.compile=true", "model.compile_mode=fast"],
        None,
        r"model\.compile_mode='fast': expected default or max-autotune-no-cudagraphs or null",
    ),
    (
        "a compile mode that replays CUDA graphs",
        ["model.compile=true", "model.compile_mode=reduce-overhead"],
        None,
        r"model\.compile_mode='reduce-overhead': CUDA graphs do not work",
    ),
    (
        "a compile scope lorafit does not have",
        ["model.compile=true", "model.compile_scope=model"],
        None,
        r"model\.compile_scope='model': expected modules or layers",
    ),
    (
        "a dequantizer lorafit does not have",
        ["adapter=qlora", "model.dequantize=triton"],
        None,
        r"model\.dequantize='triton': expected bitsandbytes or compiled",
    ),
    (
        "MLP chunks of no tokens",
        ["model.mlp_chunk_tokens=0"],
        None,
        r"model\.mlp_chunk_tokens=0: expected an integer >= 1 or null",
    ),
    (
        "a checkpointing form that is not a switch",
        ["model.gradient_checkpointing=true", "model.reentrant_checkpointing=sometimes"],
        None,
        r"model\.reentrant_checkpointing='sometimes': expected true or false",
    ),
    ("unknown wandb watch", ["logger=wandb", "logger.wandb.watch=weights"], None, r"wandb\.watch"),
    (
        "nothing to adapt",
        ["adapter.target_linear=false", "adapter.target_modules=[]"],
        None,
        r"nothing would be adapted",
    ),
    ("no new tokens to generate", ["eval.max_new_tokens=0"], None, r"eval\.max_new_tokens=0"),
    ("zero temperature", ["eval.temperature=0"], None, r"eval\.temperature=0"),
    (
        "JSON that stops parsing",
        [],
        ("rows.json", '[\n {"instruction": "x",\n  "output": }\n]'),
        r"rows\.json: could not be read as json: line 3 column 13: Expecting value",
    ),
    (
        "JSON Lines with a broken line",
        [],
        ("rows.jsonl", json.dumps(GOOD) + "\n" + json.dumps(GOOD)[:-3] + "\n"),
        r"rows\.jsonl: could not be read as json: line 2 column \d+",
    ),
]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("case", "overrides", "data", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_stops_with_one_message_and_damages_nothing(
    tmp_path, case, overrides, data, message
):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.yaml").write_text("a previous run's config\n")
    (out / "checkpoints" / "last.ckpt").write_bytes(b"a previous run's checkpoint")
    before = _snapshot(out)
    if data is not None:
        name, content = data
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        overrides = ["data=local", f"data.datasets.0.path={path}", *overrides]
    with pytest.raises(LorafitError, match=message) as error:
        train(compose_config([*TINY, *overrides], out))
    assert "\n" not in str(error.value)  # one line
    assert _snapshot(out) == before


def _real_checkpoint() -> bytes:
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(4096)}, "global_step": 3}, buffer)
    return buffer.getvalue()


def _not_a_checkpoint() -> bytes:
    buffer = io.BytesIO()
    torch.save([1, 2, 3], buffer)
    return buffer.getvalue()


def _adapter(config: object = None, weights: bytes | None = None) -> dict[str, bytes]:
    """An adapter folder's files; the defaults are well-formed."""
    if config is None:
        config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    if weights is None:
        weights = safetensors_save({"base_model.lora_A.weight": torch.zeros(8, 64)})
    text = config if isinstance(config, str) else json.dumps(config)
    return {
        "adapter/adapter_config.json": text.encode(),
        "adapter/adapter_model.safetensors": weights,
    }


GOOD_WEIGHTS = safetensors_save({"base_model.lora_A.weight": torch.zeros(8, 64)})

# (case, overrides with {tmp} for the test's folder, files to create under it, message)
FILE_CASES = [
    (
        "empty resume checkpoint",
        ["resume_from_checkpoint={tmp}/a.ckpt"],
        {"a.ckpt": b""},
        r"resume_from_checkpoint=.*a\.ckpt: not a readable checkpoint",
    ),
    (
        "text as resume checkpoint",
        ["resume_from_checkpoint={tmp}/a.ckpt"],
        {"a.ckpt": b"not a checkpoint at all\n"},
        r"a\.ckpt: not a readable checkpoint",
    ),
    (
        "truncated resume checkpoint",
        ["resume_from_checkpoint={tmp}/a.ckpt"],
        {"a.ckpt": _real_checkpoint()[:600]},
        r"a\.ckpt: not a readable checkpoint",
    ),
    (
        "foreign file as resume checkpoint",
        ["resume_from_checkpoint={tmp}/a.ckpt"],
        {"a.ckpt": _not_a_checkpoint()},
        r"a\.ckpt: not a Lightning checkpoint",
    ),
    (
        "resume run folder without checkpoints",
        ["resume_from_checkpoint={tmp}/old"],
        {"old/config.yaml": b"model: {}\n"},
        r"resume_from_checkpoint=.*old: the run folder has no checkpoints/last\.ckpt",
    ),
    (
        "missing starting adapter",
        ["adapter.lora_model_dir={tmp}/nowhere"],
        {},
        r"adapter\.lora_model_dir=.*nowhere: no such folder",
    ),
    (
        "starting adapter without its config",
        ["adapter.lora_model_dir={tmp}/adapter"],
        {"adapter/adapter_model.safetensors": GOOD_WEIGHTS},
        r"no adapter_config\.json",
    ),
    (
        "starting adapter config that does not parse",
        ["adapter.lora_model_dir={tmp}/adapter"],
        _adapter('{"peft_type": "LORA",\n "r": }'),
        r"adapter_config\.json: not valid JSON \(line 2 column 7",
    ),
    (
        "starting adapter that is not LoRA",
        ["adapter.lora_model_dir={tmp}/adapter"],
        _adapter({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8}),
        r"adapter_config\.json: not a LoRA adapter config \(peft_type 'PREFIX_TUNING'\)",
    ),
    (
        "starting adapter without weights",
        ["adapter.lora_model_dir={tmp}/adapter"],
        {"adapter/adapter_config.json": _adapter()["adapter/adapter_config.json"]},
        r"adapter_model\.safetensors is missing",
    ),
    (
        "starting adapter with empty weights",
        ["adapter.lora_model_dir={tmp}/adapter"],
        _adapter(weights=b""),
        r"adapter_model\.safetensors: not a readable safetensors file",
    ),
    (
        "starting adapter with truncated weights",
        ["adapter.lora_model_dir={tmp}/adapter"],
        _adapter(weights=GOOD_WEIGHTS[:-100]),
        r"adapter_model\.safetensors: not a readable safetensors file",
    ),
    (
        "output folder that is a file",
        ["output_dir={tmp}/taken"],
        {"taken": b"x"},
        r"output_dir=.*taken: .*taken is a file, not a folder",
    ),
    (
        "output folder below a file",
        ["output_dir={tmp}/taken/run"],
        {"taken": b"x"},
        r"output_dir=.*taken/run: .*taken is a file, so the folder cannot be created",
    ),
    (
        "output folder that cannot be written",
        ["output_dir=/proc/lorafit-run"],
        {},
        r"output_dir=/proc/lorafit-run: /proc cannot be written",
    ),
    (
        "checkpoint folder that cannot be written",
        ["callbacks.model_checkpoint.dirpath=/proc/lorafit-checkpoints"],
        {},
        r"callbacks\.model_checkpoint\.dirpath=.*cannot be written",
    ),
    (
        "prepared-data folder that is a file",
        ["data.dataset_prepared_path={tmp}/taken"],
        {"taken": b"x"},
        r"data\.dataset_prepared_path=.*taken is a file",
    ),
]


@pytest.mark.parametrize(
    ("case", "overrides", "files", "message"), FILE_CASES, ids=[c[0] for c in FILE_CASES]
)
def test_unusable_files_and_folders_stop_with_one_message_and_damage_nothing(
    tmp_path, case, overrides, files, message
):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"a previous run's checkpoint")
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    before = _snapshot(tmp_path)
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    output = next((o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")), out)
    with pytest.raises(LorafitError, match=message) as error:
        train(compose_config([*TINY, *overrides], output))
    assert "\n" not in str(error.value)
    assert _snapshot(tmp_path) == before


EVAL_CASES = [
    ("empty checkpoint", "a.ckpt", {"a.ckpt": b""}, r"ckpt=.*a\.ckpt: not a readable checkpoint"),
    (
        "foreign checkpoint",
        "a.ckpt",
        {"a.ckpt": _not_a_checkpoint()},
        r"a\.ckpt: not a Lightning checkpoint",
    ),
    (
        "adapter config that does not parse",
        "adapter",
        _adapter("{"),
        r"adapter_config\.json: not valid JSON \(line 1 column 2",
    ),
    (
        "adapter with truncated weights",
        "adapter",
        _adapter(weights=GOOD_WEIGHTS[:50]),
        r"adapter_model\.safetensors: not a readable safetensors file",
    ),
    (
        "run folder with a damaged config",
        "run",
        {
            "run/config.yaml": b"model: [unclosed\n",
            **{f"run/{k}": v for k, v in _adapter().items()},
        },
        r"run/config\.yaml: not a readable run config",
    ),
]


@pytest.mark.parametrize(
    ("case", "ckpt", "files", "message"), EVAL_CASES, ids=[c[0] for c in EVAL_CASES]
)
def test_eval_refuses_unreadable_checkpoints_before_building_a_model(
    tmp_path, case, ckpt, files, message
):
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=message) as error:
        evaluate(compose_config([f"ckpt={tmp_path / ckpt}"], tmp_path / "eval"))
    assert "\n" not in str(error.value)
    assert _snapshot(tmp_path) == before and not (tmp_path / "eval").exists()


@pytest.mark.parametrize(
    ("override", "meant"),
    [
        ("adapter.lora_r=8", "adapter.r"),
        ("learning_rate=1e-4", "optimizer.lr"),
        ("trainer.max_step=3", "trainer.max_steps"),
        ("data.sequenc_len=64", "data.sequence_len"),
    ],
)
def test_an_unknown_key_suggests_the_key_meant(override, meant):
    message = config_error(["experiment=tiny", override], CONF_DIR)
    assert f"unknown config key '{override.split('=')[0]}'" in message
    assert f"did you mean {meant}" in message


def test_known_keys_and_sweeps_pass_the_unknown_key_check():
    assert config_error(["experiment=tiny", "adapter.r=8"], CONF_DIR) is None
    assert config_error(["adapter.r=8,16"], CONF_DIR) is None


COMMAND_LINE_CASES = [
    (
        "unknown group option",
        ["adapter=qloraa"],
        r"adapter=qloraa: no such option; did you mean "
        r"adapter=qlora\? \(options: lora, lora_8bit, none, qlora\)",
    ),
    (
        "unknown experiment",
        ["experiment=nope"],
        r"experiment=nope: no such option \(options: .*tiny",
    ),
    ("override that does not parse", ["adapter.r=[1"], r"bad override \(.*adapter\.r=\[1\)"),
    ("adding a key that exists", ["+adapter.r=3"], r"Could not append to config"),
    (
        "adding a key nothing reads",
        ["+learning_rate=1e-4"],
        r"\+learning_rate adds a config key that nothing reads; did you mean optimizer\.lr",
    ),
    (
        "adding an argument the trainer lacks",
        ["+trainer.foo=1"],
        r"\+trainer\.foo: lightning\.pytorch\.Trainer takes no argument 'foo'",
    ),
    (
        "adding a misspelled adapter key",
        ["+adapter.lora_r=8"],
        r"LoraAdapter takes no argument 'lora_r'; did you mean adapter\.r",
    ),
    ("a bad value, before any folder exists", ["trainer.devices=0"], r"trainer\.devices=0"),
]


@pytest.mark.parametrize(
    ("case", "overrides", "message"), COMMAND_LINE_CASES, ids=[c[0] for c in COMMAND_LINE_CASES]
)
def test_command_line_errors_are_one_line(case, overrides, message):
    error = config_error(["experiment=tiny", *overrides], CONF_DIR)
    assert error is not None and "\n" not in error
    assert re.search(message, error), error


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("export.dtype=float8", r"export\.dtype='float8'"),
        ("export.max_kl=-1", r"export\.max_kl=-1"),
        ("eval.max_new_tokens=0", r"eval\.max_new_tokens=0"),
    ],
)
def test_export_and_eval_settings_are_refused_before_a_model_loads(override, message):
    assert re.search(message, config_error(["ckpt=none", override], CONF_DIR, "eval"))


def test_the_tools_need_a_checkpoint():
    assert "set ckpt" in config_error([], CONF_DIR, "eval")


def test_arguments_the_config_takes_pass_the_command_line_check():
    assert config_error(["+optimizer.betas=[0.9,0.95]"], CONF_DIR) is None  # AdamW takes it
    assert config_error(["ckpt=none", "prompt=Hi.", "input=x"], CONF_DIR, "eval") is None
    assert "nothing reads" in config_error(["+prompt=Hi."], CONF_DIR)  # training has no prompt
    assert config_error(["hparams_search=optuna", "experiment=tiny"], CONF_DIR) is None
    monitor = "+callbacks.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor"
    assert config_error([monitor, "+callbacks.lr.logging_interval=step"], CONF_DIR) is None
    assert "takes no argument 'logging_intervall'" in config_error(
        [monitor, "+callbacks.lr.logging_intervall=step"], CONF_DIR
    )


@pytest.mark.parametrize(
    ("script", "arguments"),
    [
        ("train.py", ["adapter=qloraa"]),  # Hydra's composition error, before the run starts
        ("eval.py", ["ckpt={tmp}/empty.ckpt"]),  # a LorafitError inside the run
    ],
)
@pytest.mark.slow
def test_entry_points_exit_with_status_2_and_one_line(tmp_path, script, arguments):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    command = [sys.executable, str(CONF_DIR.parent / script)]
    command += [a.format(tmp=tmp_path) for a in arguments] + [f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_asking_for_a_gpu_without_one_is_refused_with_the_cpu_option(tmp_path):
    with pytest.raises(LorafitError, match=r"trainer\.accelerator=gpu, but .* trainer=cpu"):
        train(compose_config([*TINY, "trainer.accelerator=gpu"], tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# Accepted with a warning, not refused: the run goes on and the log says what happened.
def test_rows_with_an_empty_answer_train_with_a_warning_naming_them(tmp_path, caplog):
    rows = [GOOD] * 20 + [{"instruction": "Say nothing.", "input": "", "output": ""}]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    overrides = [*TINY, "data=local", f"data.datasets.0.path={path}", "trainer.max_steps=1"]
    with caplog.at_level(logging.WARNING, logger="lorafit"):
        train(compose_config(overrides, tmp_path / "run"))
    warned = [r.getMessage() for r in caplog.records if "empty 'output'" in r.getMessage()]
    assert len(warned) == 1 and "1 row(s)" in warned[0] and "(rows 20)" in warned[0]


@pytest.mark.slow
def test_a_validation_interval_longer_than_an_epoch_validates_each_epoch(tmp_path, caplog):
    # Packing the demo set into 2048-token rows leaves 2 training batches, fewer than the 4
    # that experiment=tiny validates after: Lightning alone stops with a traceback.
    overrides = [
        *TINY,
        "data.sample_packing=true",
        "data.sequence_len=2048",
        "trainer.max_epochs=1",
    ]
    with caplog.at_level(logging.WARNING, logger="lorafit"):
        train(compose_config(overrides, tmp_path))
    assert any("val_check_interval=4 is more than" in r.getMessage() for r in caplog.records)
    recorded = OmegaConf.load(tmp_path / "config.yaml")
    assert recorded.trainer.val_check_interval == 2  # what ran is what the record says
    assert len(logged(tmp_path, "val/loss")) >= 1
