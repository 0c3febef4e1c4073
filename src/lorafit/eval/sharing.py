"""Share a trained run on the Hugging Face Hub: its adapter (or the merged model export.py
made), with a model card that says what it is: base model, data, settings, training and
evaluation figures, and how to load it.

    python push.py ckpt=outputs/runs/<run> push.repo_id=<user>/<name>
    python push.py ckpt=outputs/runs/<run> push.repo_id=<user>/<name> push.what=merged
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData
from omegaconf import DictConfig, OmegaConf

from lorafit.errors import ConfigError, ShareError, describe
from lorafit.runs import checkpoints
from lorafit.runs.metrics_log import read_metrics

log = logging.getLogger(__name__)

WHAT = ("adapter", "merged")
# The figures a card shows, in this order, when the run or its evaluation has them.
CARD_METRICS = ("train/loss", "val/loss", "val/ppl", "exact_match", "rouge_l", "cls/f1_macro")


def _source_folder(run_dir: Path, what: str) -> Path:
    folder = run_dir / what
    if what == "merged" and not (folder / "config.json").is_file():
        raise ShareError(f"{folder} holds no merged model: run export.py ckpt={run_dir} first")
    if what == "adapter" and not (folder / "adapter_config.json").is_file():
        raise ShareError(f"{folder} holds no adapter: the run has not finished training")
    return folder


def latest_evaluation(run_dir: Path) -> dict[str, float] | None:
    """The newest eval.py metrics.json of the run, if it was evaluated."""
    found = sorted(run_dir.glob("eval/*/metrics.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text()) if found else None


def _final_training_metrics(run_dir: Path) -> dict[str, float]:
    csv_file = run_dir / "csv" / "metrics.csv"
    if not csv_file.is_file():
        return {}
    series = read_metrics(csv_file)
    return {name: series[name][-1][1] for name in ("train/loss", "val/loss") if series.get(name)}


def _table(rows: dict[str, float]) -> str:
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {name} | {rows[name]:.4f} |" for name in CARD_METRICS if name in rows]
    return "\n".join(lines)


def _prompt_format(data: DictConfig) -> str:
    """How the model expects to be prompted: the format its data taught it."""
    types = {d.get("type", "alpaca") for d in data.datasets}
    if "chat" in types:
        template = data.get("chat_template", "tokenizer_default")
        named = "the tokenizer's own" if template == "tokenizer_default" else f"the `{template}`"
        if template not in ("tokenizer_default", "chatml"):
            named = "a custom"
        return f"Prompt it with conversations in {named} chat template; it learned the replies."
    if "alpaca" in types:
        return "Prompt it with the Stanford Alpaca template (### Instruction: ... ### Response:)."
    return "It continues raw text (trained on documents, no prompt template)."


def model_card(run_dir: Path, run: DictConfig, what: str, repo_id: str) -> ModelCard:
    """The card of a run's adapter or merged model."""
    source = run.model.source
    base = source.get("repo_id")
    datasets = [str(d.path) for d in run.data.datasets]
    adapter = run.adapter
    quantization = adapter.get("quantization") or {}
    four_bit = bool(quantization.get("load_in_4bit"))
    data = ModelCardData(
        base_model=base,
        library_name="peft" if what == "adapter" else "transformers",
        datasets=[d for d in datasets if "/" in d and not Path(d).exists()] or None,
        tags=["lorafit", "lora", *(["qlora"] if four_bit else [])],
        pipeline_tag="text-generation",
    )
    base_text = f"[{base}](https://huggingface.co/{base})" if base else f"`{source._target_}`"
    training = _final_training_metrics(run_dir)
    evaluation = latest_evaluation(run_dir)
    if what == "adapter":
        usage = (
            "from peft import AutoPeftModelForCausalLM\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")'
        )
    else:
        usage = (
            "from transformers import AutoModelForCausalLM\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")'
        )
    shape = (
        f"LoRA r={adapter.r}, alpha={adapter.alpha}, dropout={adapter.dropout}, on "
        + ("every linear layer" if adapter.target_linear else ", ".join(adapter.target_modules))
        + (" of a 4-bit NF4 base (QLoRA)" if four_bit else "")
    )
    body = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"{'A LoRA adapter for' if what == 'adapter' else 'A fine-tune of'} {base_text}, "
        f"trained with lorafit on {', '.join(f'`{d}`' for d in datasets)}.",
        "",
        _prompt_format(run.data),
        "",
        "## Training",
        "",
        f"- {shape}",
        f"- sequence length {run.data.sequence_len}, "
        f"{'packed' if run.data.sample_packing else 'unpacked'}, batch {run.data.batch_size}, "
        f"learning rate {run.optimizer.lr}, seed {run.seed}",
        "",
    ]
    if training:
        body += ["Final figures of training:", "", _table(training), ""]
    if evaluation:
        body += ["## Evaluation", "", "On the held-out split (lorafit `eval.py`):", ""]
        body += [_table(evaluation), ""]
    body += ["## Use", "", "```python", usage, "```", ""]
    body += ["## Config", "", "```yaml", OmegaConf.to_yaml(run).rstrip(), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def stage(folder: Path, card: ModelCard, into: Path) -> Path:
    """The files that go up: the folder's own, and the card as README.md."""
    shutil.copytree(folder, into, dirs_exist_ok=True)
    card.save(into / "README.md")
    return into


def push(cfg: DictConfig) -> str:
    """Push `cfg.ckpt`'s run (adapter or merged model, per `cfg.push.what`) to
    `cfg.push.repo_id`; returns the repository's address."""
    settings = cfg.push
    if not settings.repo_id or "/" not in str(settings.repo_id):
        raise ConfigError("set push.repo_id=<user or organisation>/<name>")
    if settings.what not in WHAT:
        raise ConfigError(f"push.what={settings.what!r}: expected {' or '.join(WHAT)}")
    checkpoint = checkpoints.resolve(cfg.ckpt)
    if checkpoint.run_dir is None:
        raise ShareError(f"ckpt={cfg.ckpt}: not part of a lorafit run; name the run folder")
    folder = _source_folder(checkpoint.run_dir, settings.what)
    repo_id = str(settings.repo_id)
    card = model_card(checkpoint.run_dir, checkpoint.run_config, settings.what, repo_id)
    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="lorafit-push-") as tmp:
        staged = stage(folder, card, Path(tmp) / "upload")
        try:
            api.create_repo(repo_id, private=bool(settings.private), exist_ok=True)
            commit = api.upload_folder(
                folder_path=str(staged),
                repo_id=repo_id,
                commit_message=f"lorafit: {settings.what} of {checkpoint.run_dir.name}",
            )
        except Exception as error:  # noqa: BLE001 - network, auth and Hub errors alike
            raise ShareError(
                f"push.repo_id={repo_id}: the Hub refused or could not be reached "
                f"({describe(error)}); log in with `hf auth login` and check the network"
            ) from error
    address = getattr(commit, "repo_url", None) or f"https://huggingface.co/{repo_id}"
    log.info("pushed %s of %s to %s", settings.what, checkpoint.run_dir, address)
    return str(address)
