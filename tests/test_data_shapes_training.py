"""Raw text and conversations through the whole pipeline on the tiny Mistral: train, then
evaluate and answer in the run's own format."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from helpers import SHARED_DATA, TINY, compose_config, logged
from lorafit.eval import answers
from lorafit.eval.evaluation import evaluate, generate, load_trained
from lorafit.training import train

pytestmark = pytest.mark.slow
EVAL = ["eval.max_samples=4", "eval.max_new_tokens=6"]


def _corpus(tmp_path: Path) -> Path:
    """Web text from the shared sample when present (else repeated prose), as JSON lines."""
    source = SHARED_DATA / "c4_demo.jsonl"
    if source.is_file():
        lines = source.read_text().splitlines()[:40]
    else:
        prose = "the river runs past the mill and the mill turns all day long " * 12
        lines = [json.dumps({"text": f"{i} {prose}"}) for i in range(40)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_raw_text_trains_the_tiny_model_and_evaluates_on_loss_alone(tmp_path):
    run = tmp_path / "run"
    overrides = [
        *TINY,
        "data=completion",
        f"data.datasets.0.path={_corpus(tmp_path)}",
        "data.sequence_len=128",
        "data.val_set_size=4",
        "trainer.max_steps=6",
        "trainer.val_check_interval=6",
    ]
    train(compose_config(overrides, run))
    losses = logged(run, "train/loss")
    assert len(losses) == 6 and losses[-1] < losses[0]
    out = tmp_path / "eval"
    metrics = evaluate(compose_config([f"ckpt={run}", *EVAL], out), EVAL)
    assert metrics["val/loss"] == pytest.approx(logged(run, "val/loss")[-1], abs=1e-4)
    assert "exact_match" not in metrics  # raw text has no answers to score
    assert (out / "report.md").is_file()


def test_a_chat_run_is_evaluated_and_answers_through_its_template(tmp_path):
    run = tmp_path / "run"
    train(compose_config([*TINY, "data=demo_chat", "data.chat_template=chatml"], run))
    assert len(logged(run, "train/loss")) == 4
    metrics = evaluate(compose_config([f"ckpt={run}", *EVAL], tmp_path / "eval"), EVAL)
    assert metrics["samples"] == 4 and 0 <= metrics["exact_match"] <= 1
    cfg, module, datamodule, _ = load_trained(compose_config([f"ckpt={run}", *EVAL]))
    prompter = datamodule.prompter()
    assert prompter.style == "chat" and prompter.stop_strings == ["<|im_end|>"]

    def answer(prompt_ids):
        return generate(module, prompter, prompt_ids, max_new_tokens=4)

    out, ask = io.StringIO(), io.StringIO()
    assert answers.chat(answer, prompter, iter(["Hi.\n", "Again.\n", "\n"]), out, ask) == 2
    assert len(out.getvalue().splitlines()) == 2
