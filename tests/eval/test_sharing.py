"""Sharing a run on the Hub: the files that go up, the model card, and one clear error when
the Hub cannot be reached. The network call itself is replaced by a recorder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi
from omegaconf import OmegaConf

from helpers import TINY, compose_config
from lorafit.errors import ConfigError, ShareError
from lorafit.eval.sharing import model_card, push
from lorafit.training import train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    train(compose_config([*TINY, "trainer.max_steps=2"], folder))
    evaluation = folder / "eval" / "2026-01-01_00-00-00"
    evaluation.mkdir(parents=True)
    scores = {"val/loss": 9.87654, "exact_match": 0.25, "rouge_l": 0.5, "samples": 4}
    (evaluation / "metrics.json").write_text(json.dumps(scores))
    return folder


@pytest.fixture
def hub(monkeypatch, tmp_path) -> dict:
    """What would have been sent: the repository made and the files uploaded."""
    sent: dict = {"uploaded": tmp_path / "uploaded"}

    def create_repo(self, repo_id, **kwargs):
        sent["created"] = (repo_id, kwargs)

    def upload_folder(self, *, folder_path, repo_id, commit_message, **kwargs):
        shutil.copytree(folder_path, sent["uploaded"])
        sent["upload"] = (repo_id, commit_message)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return sent


def _push(run: Path, *overrides: str):
    return push(compose_config([f"ckpt={run}", "push.repo_id=someone/tiny-lora", *overrides]))


def test_the_adapter_goes_up_with_a_card_of_the_run(run, hub):
    address = _push(run)
    assert address.endswith("someone/tiny-lora")
    assert hub["created"] == ("someone/tiny-lora", {"private": True, "exist_ok": True})
    files = {p.name for p in hub["uploaded"].iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    card = (hub["uploaded"] / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and "lorafit" in front["tags"]
    trained = OmegaConf.load(run / "config.yaml").adapter
    assert f"LoRA r={trained.r}, alpha={trained.alpha}" in card
    assert "| val/loss | 9.8765 |" in card and "| exact_match | 0.2500 |" in card
    assert 'AutoPeftModelForCausalLM.from_pretrained("someone/tiny-lora")' in card
    assert "builtin:demo_alpaca" in card  # the data it was trained on


def test_a_merged_model_needs_the_export_first(run, hub):
    with pytest.raises(ShareError, match="run export.py"):
        _push(run, "push.what=merged")
    with pytest.raises(ConfigError, match="push.what='both'"):
        _push(run, "push.what=both")
    with pytest.raises(ConfigError, match="push.repo_id"):
        push(compose_config([f"ckpt={run}"]))
    assert "created" not in hub


def test_a_hub_model_card_names_the_base_model_and_data(tmp_path):
    cfg = compose_config([], tmp_path)  # the canonical job: Mistral-7B QLoRA on alpaca_2k_test
    card = model_card(
        tmp_path, OmegaConf.create(OmegaConf.to_container(cfg.copy())), "adapter", "a/b"
    )
    front = yaml.safe_load(str(card).split("---")[1])
    assert front["base_model"] == "mistralai/Mistral-7B-v0.1"
    assert front["datasets"] == ["mhenrichsen/alpaca_2k_test"] and "qlora" in front["tags"]
    assert "of a 4-bit NF4 base (QLoRA)" in str(card)
    assert "Stanford Alpaca template" in str(card)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["data=demo_chat"], "conversations in the tokenizer's own chat template"),
        (["data=demo_chat", "data.chat_template=chatml"], "in the `chatml` chat template"),
        (["data=completion", "data.datasets.0.path=c.jsonl"], "continues raw text"),
    ],
)
def test_the_card_says_how_to_prompt_the_model(tmp_path, overrides, says):
    cfg = compose_config(overrides, tmp_path)
    card = model_card(tmp_path, cfg, "adapter", "a/b")
    assert says in str(card)


def test_an_unreachable_hub_is_one_error_naming_the_repository(run, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ShareError, match=r"push.repo_id=someone/tiny-lora: the Hub refused"):
        _push(run)
