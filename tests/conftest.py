"""Test session set-up: an isolated model cache, offline libraries, two threads, GPU tests
shrunk or skipped without CUDA, and the shared fixtures. Helpers live in tests/helpers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from helpers import SHARED_DATA

# Converted models and tokenizers go to one folder that every test session reuses (the cache is
# keyed by content and format, and safe to share), never the user's cache. Tests of the
# conversions themselves give them a cache of their own.
os.environ["LORAFIT_CACHE"] = str(Path(tempfile.gettempdir()) / "lorafit-test-cache")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
if not torch.cuda.is_available() and os.environ.get("LORAFIT_GPU_DRY_RUN") != "1":
    # The GPU suite's shrunk tests record no GPU figure: their JSON stays out of the checkout.
    os.environ.setdefault("LORAFIT_GPU_RESULTS", tempfile.mkdtemp(prefix="lorafit-gpu-results-"))


@pytest.fixture(scope="session")
def demo_examples():
    """The first 24 demo rows, tokenized with the real Mistral tokenizer."""
    from lorafit.data.examples import TokenizedExamples
    from lorafit.data.sources import load_rows
    from lorafit.data.tokenization import tokenize_alpaca
    from lorafit.model.sources import mistral_tokenizer

    rows = load_rows([{"path": "builtin:demo_alpaca"}])[:24]
    examples, _ = tokenize_alpaca(rows, mistral_tokenizer(), sequence_len=256)
    return TokenizedExamples.from_lists(examples)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    # Without CUDA, the GPU suite's in-process tests run at a shrunk size on the CPU, so a
    # change that breaks them shows in every run; those that start the entry points as
    # subprocesses only with LORAFIT_GPU_DRY_RUN=1 (a minute). The rest of the suite skips.
    dry_run = os.environ.get("LORAFIT_GPU_DRY_RUN") == "1"
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" not in item.keywords:
            continue
        shrunk = "gpu_dry_run" in item.keywords and (dry_run or "gpu_cli" not in item.keywords)
        if not shrunk:
            item.add_marker(skip)


@pytest.fixture
def shared_alpaca() -> Path:
    path = SHARED_DATA / "alpaca_en_demo.json"
    if not path.is_file():
        pytest.skip("../shared/data/alpaca_en_demo.json is not present")
    return path


@pytest.fixture(params=["cpu form", "gpu form"])
def dropout_forms(request, monkeypatch):
    """Runs a test with LoRA dropout's CPU form and again with the two-pass form it takes on a
    GPU (`lora_dropout.dropped_as`), so the GPU's form is checked on every run."""
    from lorafit.model import lora_dropout

    if request.param == "gpu form":
        monkeypatch.setattr(lora_dropout, "CPU_FORM_DEVICES", frozenset())
    return request.param
