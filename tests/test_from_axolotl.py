"""An Axolotl-style config becomes a lorafit experiment: the example converts to the canonical
job key for key, and every key it cannot honour is refused by name."""

from __future__ import annotations

import shutil

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers import CONF_DIR
from lorafit.errors import ConfigError
from lorafit.from_axolotl import convert, main

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
    assert _resolved(conf, "from_example") == _resolved(conf, "mistral7b_qlora_alpaca2k")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        logger = compose("train", overrides=["experiment=from_example"]).logger
    assert (logger.wandb.project, logger.wandb.log_adapter) == ("lorafit", True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lora_rr": 8}, r"unknown key 'lora_rr'; did you mean lora_r\?"),
        ({"early_stopping_patience": 3}, r"early_stopping_patience is not supported"),
        ({"load_in_8bit": True}, r"cannot both be true"),
        ({"datasets": [{"path": "x.jsonl", "type": "sharegpt"}]}, r"datasets.0.type"),
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
