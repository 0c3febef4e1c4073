"""`evaluate(cfg)`: how good is a fine-tune? Validation loss exactly as in training, then
greedy (or sampled) answers to held-out prompts scored against the references.

    python eval.py ckpt=outputs/runs/<run>          # or <run>/adapter, or a .ckpt file
    python eval.py ckpt=none experiment=quickstart   # the base model, for a before / after
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from lorafit.data.datamodule import FineTuneDataModule
from lorafit.data.prompter import Prompter
from lorafit.errors import EvaluationError
from lorafit.eval import report, text_metrics
from lorafit.model.module import CausalLMModule, build_module
from lorafit.model.sources import set_special_tokens
from lorafit.runs import checkpoints
from lorafit.runs.strategies import StayOnDevice

log = logging.getLogger(__name__)


def load_trained(
    cfg: DictConfig, overrides: Sequence[str] = ()
) -> tuple[DictConfig, CausalLMModule, FineTuneDataModule, checkpoints.Checkpoint]:
    """Build the model of `cfg.ckpt` with its trained weights, and its data module."""
    checkpoint = checkpoints.resolve(cfg.ckpt)
    cfg = checkpoints.merge_run_config(cfg, checkpoint, list(overrides))
    datamodule = instantiate(cfg.data)
    datamodule.load_rows()
    tokenizer = instantiate(cfg.model.source).load_tokenizer()
    datamodule.connect(set_special_tokens(tokenizer, cfg.model.get("special_tokens")))
    pl.seed_everything(cfg.seed)
    use_gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    module = build_module(cfg, load_device=device)
    module.configure_model()
    module.to(module.load_device)
    checkpoints.load_weights(module, checkpoint)
    return cfg, module.eval(), datamodule, checkpoint


@torch.no_grad()
def generate(
    module: CausalLMModule,
    prompter: Prompter,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    batch_size: int = 8,
) -> list[str]:
    """Completions of `prompts` (token ids from `prompter`), without the prompt, the special
    tokens and the template's end of turn."""
    tokenizer = prompter.tokenizer
    tokenizer.padding_side = "left"  # generation continues from the right end of each row
    stops = prompter.stop_strings
    completions: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer.pad(
                {"input_ids": [list(p) for p in prompts[start : start + batch_size]]},
                return_tensors="pt",
            ).to(module.device)
            output = module.model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=prompter.stop_token_ids,
                # A multi-token end of turn (chatml's markers to a tokenizer without them).
                **({"stop_strings": stops, "tokenizer": tokenizer} if stops else {}),
            )
            new = output[:, batch["input_ids"].shape[1] :]
            completions += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = "right"
    return [prompter.clean(completion) for completion in completions]


def validation_metrics(cfg: DictConfig, module: CausalLMModule, datamodule: Any) -> dict:
    """val/loss and val/ppl exactly as training computes them (same precision and batches), on
    the device the model was loaded on, where it stays for generation and export."""
    device = module.load_device
    trainer = instantiate(
        cfg.trainer,
        logger=False,
        callbacks=[],
        enable_progress_bar=False,
        accelerator="cuda" if device.type == "cuda" else "cpu",
        devices=1,  # a run trained with DDP is evaluated on one device
        strategy=StayOnDevice(device),
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    # The module logs its validation metrics itself (at its own step numbering), so they are
    # read from the callback metrics rather than validate()'s logger-bound return value.
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def _labels(cfg: DictConfig, references: Sequence[str]) -> list[str] | None:
    if cfg.eval.labels:
        return list(cfg.eval.labels)
    distinct = sorted({text_metrics.normalize_answer(r) for r in references})
    # A handful of distinct answers, each repeated: a classification task.
    if len(distinct) <= cfg.eval.max_auto_labels and len(references) >= 2 * len(distinct):
        return distinct
    return None


def evaluate(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Evaluate `cfg.ckpt`; writes metrics.json, report.md and plots to `cfg.output_dir`."""
    cfg, module, datamodule, checkpoint = load_trained(cfg, overrides)
    _, val_rows = datamodule.load_rows()
    if not val_rows:
        raise EvaluationError(
            "there is no held-out split to evaluate on: set data.val_set_size above 0"
        )
    metrics = validation_metrics(cfg, module, datamodule)
    prompter = datamodule.prompter()
    # Raw-text rows have no answer to score: they count in val/loss only.
    rows = [row for row in val_rows if prompter.scorable(row)][: cfg.eval.max_samples]
    if not rows:
        log.info("the held-out rows are raw text: val/loss and val/ppl only, no answers scored")
        _write_outputs(cfg, checkpoint, metrics, [], [], [])
        return metrics
    references = [prompter.reference(r) for r in rows]
    generations = generate(
        module,
        prompter,
        [prompter.row_prompt(r) for r in rows],
        cfg.eval.max_new_tokens,
        cfg.eval.do_sample,
        cfg.eval.temperature,
        batch_size=cfg.eval.batch_size,
    )
    metrics["exact_match"] = text_metrics.exact_match(generations, references)
    metrics["rouge_l"] = text_metrics.rouge_l(generations, references)
    labels = _labels(cfg, references)
    if labels:
        try:
            scored = text_metrics.classification_metrics(generations, references, labels)
            metrics.update({f"cls/{k}": v for k, v in scored.items()})
        except ValueError as error:
            log.warning("classification metrics skipped: %s", error)
    metrics["samples"] = len(rows)
    # The report shows what was asked, not the template around it on every row.
    asked = [prompter.asked(r) for r in rows]
    _write_outputs(cfg, checkpoint, metrics, asked, references, generations)
    return metrics


def _write_outputs(
    cfg: DictConfig,
    checkpoint: checkpoints.Checkpoint,
    metrics: dict[str, float],
    prompts: Sequence[str],
    references: Sequence[str],
    generations: Sequence[str],
) -> None:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    images = []
    if checkpoint.run_dir is not None:
        curves = report.plot_loss_curves(
            checkpoint.run_dir / "csv" / "metrics.csv", out / "loss_curves.png"
        )
        images += [curves] if curves else []
    before = json.loads(Path(cfg.eval.baseline).read_text()) if cfg.eval.baseline else None
    if before is not None:
        keys = [k for k in ("val/loss", "exact_match", "rouge_l", "cls/f1_macro") if k in before]
        images.append(report.plot_before_after(before, metrics, out / "before_after.png", keys))
    samples = [
        {"prompt": p, "reference": r, "generation": g}
        for p, r, g in zip(prompts, references, generations, strict=True)
    ][: cfg.eval.report_samples]
    title = f"Evaluation of {checkpoint.path or 'the base model'}"
    report.write_report(out / "report.md", title, metrics, samples, images, before)
    log.info("evaluation written to %s: %s", out, metrics)
