"""Shared test set-up: the real Hydra config, shrunk by overrides, and an isolated cache."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Converted models and tokenizers go to a fresh folder per test session, never the user's cache,
# so every session exercises the conversions it relies on.
os.environ["LORAFIT_CACHE"] = tempfile.mkdtemp(prefix="lorafit-test-cache-")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The base of every training test: tiny random Mistral, fp32 on CPU, a few steps, no clutter.
TINY = [
    "experiment=tiny",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",  # with callbacks.progress_bar left configured
]


def compose_config(overrides: list[str], output_dir: Path | str = "unused") -> DictConfig:
    """The run config exactly as `python train.py <overrides>` would compose it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"output_dir={output_dir}"])


def logged(output_dir: Path, key: str) -> list[float]:
    """Every value of one metric in the run's metrics.csv, in logging order."""
    with open(output_dir / "csv" / "metrics.csv") as handle:
        return [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]


def packed_test_module(
    attn: str = "sdpa", checkpointing: bool = False, overrides: tuple[str, ...] = ()
):
    """A tiny LoRA module with non-zero adapter weights, so the adapter takes part in what is
    compared, and no dropout."""
    from lorafit.model.module import CausalLMModule

    cfg = compose_config(
        [
            *TINY,
            f"model.attn_implementation={attn}",
            "adapter.dropout=0",
            f"model.gradient_checkpointing={str(checkpointing).lower()}",
            *overrides,
        ]
    )
    torch.manual_seed(0)
    module = CausalLMModule(model=cfg.model, adapter=cfg.adapter, optimizer={}, scheduler={})
    module.configure_model()
    for name, p in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return module


def packed_demo(examples, capacity: int = 256):
    """The examples packed into rows of `capacity`, and a collate for one row at a time."""
    from lorafit.data.examples import PackedExamples
    from lorafit.data.packing import pack_rows, packed_collate

    packed = PackedExamples(examples, pack_rows(examples.lengths().tolist(), capacity))
    return packed, lambda items: packed_collate(items, pad_token_id=0)


@pytest.fixture(scope="session")
def demo_examples():
    """The first 24 demo rows, tokenized with the real Mistral tokenizer."""
    from lorafit.data.examples import TokenizedExamples
    from lorafit.data.sources import load_alpaca
    from lorafit.data.tokenization import tokenize_alpaca
    from lorafit.model.sources import mistral_tokenizer

    rows = load_alpaca([{"path": "builtin:demo_alpaca"}])[:24]
    examples, _ = tokenize_alpaca(rows, mistral_tokenizer(), sequence_len=256)
    return TokenizedExamples.from_lists(examples)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    # LORAFIT_GPU_DRY_RUN=1 runs the GPU suite's end-to-end tests on the CPU at a shrunk size.
    dry_run = os.environ.get("LORAFIT_GPU_DRY_RUN") == "1"
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not (dry_run and "gpu_dry_run" in item.keywords):
            item.add_marker(skip)


@pytest.fixture
def shared_alpaca() -> Path:
    path = SHARED_DATA / "alpaca_en_demo.json"
    if not path.is_file():
        pytest.skip("../shared/data/alpaca_en_demo.json is not present")
    return path
