"""eval.py and export.py on the tiny Mistral: evaluation reproduces training's validation loss,
writes its report, compares with a base-model run, and the merged export keeps the logits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import TINY, compose_config, logged
from lorafit.errors import CheckpointError, EvaluationError, ExportError
from lorafit.eval.evaluation import evaluate, load_trained, validation_metrics
from lorafit.eval.export import export
from lorafit.training import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVAL = ["eval.max_samples=6", "eval.max_new_tokens=4"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    train(compose_config(TINY, run))
    return run


def _evaluate(out: Path, ckpt: str | Path, *overrides: str) -> dict:
    extra = [*EVAL, *overrides]
    return evaluate(compose_config([f"ckpt={ckpt}", *extra], out), extra)


@pytest.mark.parametrize("target", ["run", "adapter", "last.ckpt"])
def test_eval_reproduces_the_final_validation_loss(trained_run, tmp_path, target):
    ckpt = {
        "run": trained_run,
        "adapter": trained_run / "adapter",
        "last.ckpt": trained_run / "checkpoints" / "last.ckpt",
    }[target]
    metrics = _evaluate(tmp_path, ckpt)
    assert metrics["val/loss"] == pytest.approx(logged(trained_run, "val/loss")[-1], abs=1e-4)
    assert metrics["samples"] == 6 and 0 <= metrics["exact_match"] <= 1


def test_the_model_stays_on_its_device_through_validation(trained_run):
    cfg = compose_config([f"ckpt={trained_run}", *EVAL])
    cfg, module, datamodule, _ = load_trained(cfg)
    moves = []
    to_cpu = module.cpu
    # Lightning's teardown calls this on every module it ran; on a GPU it moved the model off
    # the device before generation. Here it would be a no-op, so the call itself is watched.
    module.cpu = lambda: moves.append("cpu") or to_cpu()
    metrics = validation_metrics(cfg, module, datamodule)
    assert moves == [] and metrics["val/loss"] > 0
    devices = {p.device for p in module.parameters()}
    assert devices == {module.load_device} and module.device == module.load_device


def test_eval_writes_metrics_report_and_plots(trained_run, tmp_path):
    metrics = _evaluate(tmp_path, trained_run)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    png = tmp_path / "loss_curves.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    report = (tmp_path / "report.md").read_text()
    assert "loss_curves.png" in report and "exact_match" in report
    # Samples show the instruction asked, not the template's preamble on every row.
    assert "Below is an instruction" not in report and "### Response" not in report


def test_before_and_after_compares_with_the_base_model(trained_run, tmp_path):
    base = _evaluate(tmp_path / "base", "none", "experiment=tiny")
    after = _evaluate(
        tmp_path / "after", trained_run, f"eval.baseline={tmp_path / 'base' / 'metrics.json'}"
    )
    assert after["val/loss"] < base["val/loss"]  # the fine-tune learned the demo set
    assert (tmp_path / "after" / "before_after.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "before_after.png" in (tmp_path / "after" / "report.md").read_text()


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="nope: no such file"):
        _evaluate(tmp_path, tmp_path / "nope")


def test_an_adapter_that_does_not_fit_the_base_is_refused(trained_run, tmp_path):
    with pytest.raises(CheckpointError, match="does not fit"):
        _evaluate(
            tmp_path, trained_run / "adapter", "model=tiny_mistral", "model.source.hidden_size=32"
        )
    with pytest.raises(CheckpointError, match="does not fit"):
        _evaluate(tmp_path, trained_run / "checkpoints" / "last.ckpt", "adapter.r=4")


def test_no_held_out_split_is_a_clear_error(trained_run, tmp_path):
    with pytest.raises(EvaluationError, match="val_set_size"):
        _evaluate(tmp_path, trained_run, "data.val_set_size=0")


# 8-bit layers compute in fp16 (bitsandbytes casts), so the merged fp32 model matches less closely.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("adapter", "tolerance"), [("lora", 1e-5), ("qlora", 1e-5), ("lora_8bit", 1e-3)]
)
def test_merged_export_reloads_with_the_adapter_logits(tmp_path, adapter, tolerance):
    run = tmp_path / "run"
    train(compose_config([*TINY, f"adapter={adapter}", "trainer.max_steps=2"], run))
    overrides = [f"ckpt={run}", "export.dtype=float32"]
    fidelity = export(compose_config(overrides, tmp_path / "export"), overrides)
    assert fidelity["kl_mean"] < tolerance / 10 and fidelity["loss_delta"] < tolerance
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    cfg, module, datamodule, _ = load_trained(compose_config([f"ckpt={run}"]), [f"ckpt={run}"])
    ids = torch.tensor([[1, 415, 5565, 349, 264, 1369]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, module(ids), rtol=0, atol=10 * tolerance)


@pytest.mark.slow
def test_qlora_bf16_export_passes_its_fidelity_check_and_a_strict_one_fails(tmp_path):
    run = tmp_path / "run"
    train(compose_config([*TINY, "adapter=qlora", "trainer.max_steps=2"], run))
    cfg_overrides = [f"ckpt={run}"]
    fidelity = export(compose_config(cfg_overrides, tmp_path / "bf16"), cfg_overrides)
    assert fidelity["kl_mean"] < 0.01
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    assert merged.dtype == torch.bfloat16
    strict = [f"ckpt={run}", "export.max_kl=1e-12"]
    with pytest.raises(ExportError, match="drifts from the adapter model"):
        export(compose_config(strict, tmp_path / "strict"), strict)


@pytest.mark.slow
def test_qlora_eval_reproduces_its_training_validation_loss(tmp_path):
    run = tmp_path / "run"
    train(compose_config([*TINY, "adapter=qlora"], run))
    metrics = _evaluate(tmp_path / "eval", run)
    assert metrics["val/loss"] == pytest.approx(logged(run, "val/loss")[-1], abs=1e-4)


def _cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return _clis([script, *args], cwd=cwd)[0]


def _clis(*calls: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run entry points at once, each `[script, *args]`, one torch thread each: the calls of
    this module are independent (each writes a folder of its own), and most of a call is
    importing its libraries."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if len(calls) > 1 else None
    started = [
        subprocess.Popen(
            [sys.executable, str(root / script), *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for script, *args in calls
    ]
    done = []
    for process in started:
        stdout, stderr = process.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return done


@pytest.mark.slow
def test_the_tools_write_inside_the_run_they_read_and_bad_input_leaves_no_folder(tmp_path):
    run = tmp_path / "run"
    train(compose_config([*TINY, "trainer.max_steps=2"], run))
    quick = ["eval.max_samples=2", "eval.max_new_tokens=3"]
    questions = tmp_path / "questions.txt"
    questions.write_text("Name a colour.\nAdd 2 and 3.\nName a capital.\n")
    evaluated, exported, generated = _clis(
        ["eval.py", f"ckpt={run}", *quick],
        ["export.py", f"ckpt={run}"],
        ["generate.py", f"ckpt={run}", "prompt=Name a colour.", *quick],
        cwd=tmp_path,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    (evaluation,) = (run / "eval").iterdir()
    assert (evaluation / "metrics.json").is_file() and (evaluation / "report.md").is_file()
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (run / "merged" / "config.json").is_file()
    # generate.py: the answer alone on stdout, the logs on stderr.
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert "[INFO]" not in generated.stdout and "[INFO]" in generated.stderr
    assert not (tmp_path / "outputs").exists()  # nothing in the working folder
    # Bad input: refused before Hydra makes a folder, or after, and the folder removed again.
    broken = tmp_path / "broken"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("eval", "generate", "export"))
    (broken / "adapter" / "adapter_model.safetensors").write_bytes(b"not weights")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "a"}\n')
    bad_data = ["experiment=tiny", "data=local", f"data.datasets.0.path={rows}"]
    answered, missing, unreadable, no_output = _clis(
        ["generate.py", f"ckpt={run}", f"prompts_file={questions}", *quick],
        ["eval.py", f"ckpt={tmp_path / 'nope'}"],
        ["eval.py", f"ckpt={broken}"],
        ["train.py", *bad_data, f"hydra.run.dir={tmp_path / 'bad'}"],
        cwd=tmp_path,
    )
    assert answered.returncode == 0, answered.stderr[-2000:]
    rows_out = [json.loads(line) for line in answered.stdout.splitlines()]
    assert [a["instruction"] for a in rows_out] == questions.read_text().splitlines()
    assert all(isinstance(a["output"], str) for a in rows_out)
    assert missing.returncode == 2
    assert unreadable.returncode == 2 and "not a readable safetensors file" in unreadable.stderr
    assert not (broken / "eval").exists() and not (tmp_path / "outputs").exists()
    assert no_output.returncode == 2 and "no row has the field 'output'" in no_output.stderr
    assert not (tmp_path / "bad").exists()
