"""Secrets stay out of what a run writes, and no repository code runs unless asked for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import TINY, compose_config
from lorafit.training import train

SECRET = "sk-lorafit-test-secret-0123456789"


@pytest.mark.slow
def test_tokens_in_the_environment_never_reach_run_files(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.setenv(name, SECRET)
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(compose_config([*TINY, "logger=wandb", "trainer.max_steps=2"], tmp_path))
    import wandb

    wandb.teardown()  # wandb's service may still be writing the run's last records
    files = [p for p in Path(tmp_path).rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in files) and any("wandb" in str(p) for p in files)
    leaking = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaking == []


def test_remote_code_is_off_and_checkpoints_load_without_pickle(tmp_path):
    cfg = compose_config(["adapter=qlora", "data=alpaca_2k"], tmp_path)
    assert cfg.model.source.trust_remote_code is False
    train(compose_config([*TINY, "trainer.max_steps=1"], tmp_path / "run"))
    # weights_only refuses any pickled object other than tensors and plain containers.
    torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
