"""The canonical job on one GPU, end to end: `pytest -m gpu` (scripts/gpu_suite.sh prepares an
offline GPU machine and runs it).

QLoRA r=32 over a random model of Mistral-7B-v0.1's exact shape, packed 2048-token rows, bf16
autocast, gradient checkpointing and paged AdamW for a few steps; then eval.py, generate.py and
export.py on that run, as users call them; then LoRA and 8-bit LoRA on a small model. Figures
(tokens/s, peak memory, wall times) are written as JSON to $LORAFIT_GPU_RESULTS (default
outputs/gpu-results).

Without CUDA these run on the CPU with the 7B shape shrunk to one small layer, a check of the
suite's own logic and no GPU figure: the in-process tests in every run, the three that start
eval.py, generate.py and export.py only with LORAFIT_GPU_DRY_RUN=1.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from helpers import TINY, compose_config, logged
from lorafit.eval.evaluation import generate, load_trained, validation_metrics
from lorafit.training import build_run

pytestmark = [pytest.mark.gpu, pytest.mark.gpu_dry_run]

ROOT = Path(__file__).resolve().parents[1]
ON_GPU = torch.cuda.is_available()
RESULTS = Path(os.environ.get("LORAFIT_GPU_RESULTS", ROOT / "outputs" / "gpu-results"))
STEPS = 6
# Dry run: the same job with Mistral-7B's shape shrunk, on the CPU (bf16 autocast there too).
SHRUNK = [
    "model.source.hidden_size=64",
    "model.source.intermediate_size=128",
    "model.source.num_hidden_layers=1",
    "model.source.num_attention_heads=4",
    "model.source.num_key_value_heads=2",
    "trainer.accelerator=cpu",
]
QUIET = ["trainer.enable_progress_bar=false"]
# Eval recomputes training's validation in the same precision on the same rows; bf16 kernels
# may still reorder sums between processes.
BF16_RELATIVE = 5e-3


def _device_type() -> str:
    return "cuda" if ON_GPU else "cpu"


def _record(name: str, figures: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name() if ON_GPU else "cpu (dry run: no GPU figure)"
    stack = {p: version(p) for p in ("torch", "transformers", "peft", "lightning", "bitsandbytes")}
    record = {"card": card, "versions": stack, **figures}
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")


def _cli(script: str, *args: str, out: Path) -> tuple[int, float, str]:
    """Run an entry point as a user would; returns its status, wall time and output."""
    command = [sys.executable, str(ROOT / script), *args, f"hydra.run.dir={out}"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return done.returncode, time.perf_counter() - start, done.stdout + done.stderr


class _Watch(pl.Callback):
    """Where the module's weights are at every training batch, and the peak memory."""

    def __init__(self) -> None:
        self.devices: set[str] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.devices |= {p.device.type for p in pl_module.parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def qlora_7b_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("qlora-7b")
    overrides = [
        "experiment=mistral7b_random_qlora",
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}",
        *QUIET,
        *([] if ON_GPU else SHRUNK),
    ]
    run = build_run(compose_config(overrides, out))
    watch = _Watch()
    run.trainer.callbacks.append(watch)
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run.trainer.fit(run.module, datamodule=run.datamodule)
    wall = time.perf_counter() - start
    speeds = logged(out, "train/tokens_per_s")
    figures = {
        "job": "QLoRA r=32, all linear layers, Mistral-7B-v0.1 shape (random weights), "
        "packed 2048-token rows, micro batch 1, bf16-mixed, gradient checkpointing, "
        "paged AdamW 32-bit",
        "overrides": overrides,
        "steps": run.trainer.global_step,
        # The first step pays for kernel selection and allocator growth.
        "tokens_per_s_median_after_first": statistics.median(speeds[1:]),
        "tokens_per_s_each_step": speeds,
        "peak_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if ON_GPU else None,
        "peak_memory_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if ON_GPU else None,
        "fit_wall_s": wall,
        "train_loss": logged(out, "train/loss"),
        "val_loss": logged(out, "val/loss"),
        "isolation": repr(run.module.isolation),
    }
    _record("qlora_7b_train", figures)
    return {"out": out, "run": run, "watch": watch, "figures": figures}


def test_qlora_7b_trains_on_the_gpu_in_bf16(qlora_7b_run):
    run, figures = qlora_7b_run["run"], qlora_7b_run["figures"]
    assert qlora_7b_run["watch"].devices == {_device_type()}
    assert run.trainer.global_step == STEPS
    # The preflight computed in the trainer's autocast and found the rows isolated.
    isolation = run.module.isolation
    assert isolation.precision.name == "bfloat16"
    assert isolation.worst_logit_change <= isolation.precision.eps
    assert all(torch.isfinite(torch.tensor(figures["train_loss"])))
    assert len(figures["val_loss"]) == 1


def test_the_canonical_experiment_s_speed_settings_fit_8192_token_rows_in_10_gb(tmp_path):
    # mistral7b_qlora_alpaca2k (the Hub's weights) compiles and offloads for its 8192-token
    # rows; here the same settings on the random model of that shape.
    canonical = yaml.safe_load((ROOT / "conf/experiment/mistral7b_qlora_alpaca2k.yaml").read_text())
    speed = {key: canonical["model"][key] for key in ("compile", "offload_activations")}
    assert speed == {"compile": True, "offload_activations": True}
    steps = 4
    overrides = [
        "experiment=mistral7b_random_qlora",
        "data.sequence_len=8192",
        "data.val_set_size=0",
        *(f"model.{key}=true" for key in speed),
        f"trainer.max_steps={steps}",
        *QUIET,
        *([] if ON_GPU else SHRUNK),
    ]
    run = build_run(compose_config(overrides, tmp_path))
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    run.trainer.fit(run.module, datamodule=run.datamodule)
    peak = torch.cuda.max_memory_allocated() if ON_GPU else None
    speeds = logged(tmp_path, "train/tokens_per_s")
    losses = logged(tmp_path, "train/loss")
    _record(
        "qlora_7b_canonical_settings_8192",
        {
            "overrides": overrides,
            "steps": run.trainer.global_step,
            # The first steps pay for compiling.
            "tokens_per_s_each_step": speeds,
            "peak_memory_allocated_gib": peak / 2**30 if ON_GPU else None,
            "train_loss": losses,
        },
    )
    assert run.trainer.global_step == steps
    assert all(torch.isfinite(torch.tensor(losses)))
    if ON_GPU:  # the model's load and the compiling steps included
        assert peak <= 10e9


@pytest.mark.gpu_cli
def test_eval_cli_reproduces_the_training_val_loss(qlora_7b_run, tmp_path):
    out = qlora_7b_run["out"]
    status, wall, output = _cli(
        "eval.py", f"ckpt={out}", "eval.max_samples=8", "eval.max_new_tokens=32", out=tmp_path
    )
    assert status == 0, output[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    trained = logged(out, "val/loss")[-1]
    assert metrics["val/loss"] == pytest.approx(trained, rel=BF16_RELATIVE)
    assert metrics["samples"] == 8
    _record("qlora_7b_eval", {"eval_wall_s": wall, "val_loss": metrics["val/loss"]})


def test_the_model_stays_on_the_gpu_for_generation(qlora_7b_run):
    cfg = compose_config([f"ckpt={qlora_7b_run['out']}", *QUIET])
    cfg, module, datamodule, _ = load_trained(cfg)
    validation_metrics(cfg, module, datamodule)
    assert module.load_device.type == _device_type()
    assert {p.device for p in module.parameters()} == {module.load_device}
    _, val_rows = datamodule.load_rows()
    prompter = datamodule.prompter()  # as eval.py and generate.py build their prompts
    prompts = [prompter.row_prompt(r) for r in val_rows[:8]]
    start = time.perf_counter()
    answers = generate(module, prompter, prompts, max_new_tokens=32)
    wall = time.perf_counter() - start
    assert len(answers) == 8
    _record("qlora_7b_generate", {"answers": 8, "new_tokens_each": 32, "wall_s": wall})
    if ON_GPU:  # on the CPU, this took more than 4 minutes for the 7B model
        assert wall < 60


@pytest.mark.gpu_cli
def test_generate_cli_answers(qlora_7b_run, tmp_path):
    prompt = ["prompt=Name three primary colours.", "eval.max_new_tokens=16"]
    status, _, output = _cli("generate.py", f"ckpt={qlora_7b_run['out']}", *prompt, out=tmp_path)
    assert status == 0, output[-3000:]


@pytest.mark.gpu_cli
def test_export_cli_merges_and_passes_its_fidelity_check(qlora_7b_run, tmp_path):
    # In fp32: six steps from lora_B = 0 leave updates mostly under half a bf16 step of the
    # weights they add to, so a bf16 merge drops them. On an H200 the bf16 export's check
    # failed as it should (loss 11.24 merged against 11.03 with the adapter, KL 3.8e-3).
    merged = tmp_path / "merged"
    status, wall, output = _cli(
        "export.py",
        f"ckpt={qlora_7b_run['out']}",
        f"export.output_dir={merged}",
        "export.dtype=float32",
        out=tmp_path,
    )
    assert status == 0, output[-3000:]
    fidelity = json.loads((merged / "fidelity.json").read_text())
    assert fidelity["kl_mean"] < 0.01 and fidelity["loss_delta"] < 0.01
    assert json.loads((merged / "config.json").read_text())["num_hidden_layers"] >= 1
    _record("qlora_7b_export", {"export_wall_s": wall, **fidelity})
    for file in merged.glob("*.safetensors"):  # 29 GB at full size
        file.unlink()


@pytest.mark.parametrize("adapter", ["lora", "lora_8bit"])
def test_small_model_lora_and_8bit_train_and_evaluate_on_the_gpu(adapter, tmp_path):
    gpu = ["trainer=gpu", *([] if ON_GPU else ["trainer.accelerator=cpu"])]
    overrides = [*TINY, f"adapter={adapter}", *gpu]
    run = build_run(compose_config(overrides, tmp_path / "run"))
    watch = _Watch()
    run.trainer.callbacks.append(watch)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert watch.devices == {_device_type()}
    cfg, module, datamodule, _ = load_trained(compose_config([f"ckpt={tmp_path / 'run'}"]))
    metrics = validation_metrics(cfg, module, datamodule)
    trained = logged(tmp_path / "run", "val/loss")[-1]
    assert metrics["val/loss"] == pytest.approx(trained, rel=BF16_RELATIVE)
    assert {p.device.type for p in module.parameters()} == {_device_type()}
