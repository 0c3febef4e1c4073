"""Merge a trained adapter into its base and export a plain transformers folder.

    python export.py ckpt=outputs/runs/<run>                   # bf16 safetensors, checked
    python export.py ckpt=outputs/runs/<run> export.dtype=float32

A 4-bit (QLoRA) base is dequantized first, so the merged weights are the ones the adapter was
trained against; the result is saved in `export.dtype`. The exported folder is then reloaded
with `AutoModelForCausalLM.from_pretrained` and compared with the adapter-on-base model over
the validation split: the loss difference and the mean KL divergence of the next-token
distributions are reported, and the export is an error above `export.max_kl` or
`export.max_loss_delta`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, PreTrainedModel

from lorafit.constants import IGNORE_INDEX
from lorafit.errors import ExportError
from lorafit.eval.evaluation import load_trained
from lorafit.model.losses import token_loss_sum
from lorafit.model.module import CausalLMModule

log = logging.getLogger(__name__)


def _full_precision_base(module: CausalLMModule, dtype: torch.dtype) -> PreTrainedModel:
    spec = module.hparams.model
    return instantiate(spec["source"]).load_model(
        dtype=dtype,
        quantization_config=None,
        attn_implementation=spec["attn_implementation"],
        # Built where the adapter model is: on a GPU the merge never passes through the CPU.
        device_map={"": module.load_device},
    )


def dequantize_into(module: CausalLMModule, plain: PreTrainedModel) -> None:
    """Overwrite `plain`'s weights with the dequantized ones of the module's quantized base:
    the weights the adapter saw during training, rather than the original full-precision ones.
    """
    import bitsandbytes as bnb

    targets = dict(plain.named_modules())
    for name, layer in module.model.named_modules():
        if not isinstance(layer, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
            continue
        weight = layer.weight
        if isinstance(layer, bnb.nn.Linear4bit):
            full = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        else:
            full = bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB)
        target = targets[name.removeprefix("base_model.model.").replace(".base_layer", "")]
        target.weight.data.copy_(full.to(target.weight.dtype))


def merged_model(module: CausalLMModule, dtype: torch.dtype) -> PreTrainedModel:
    """The adapter folded into a full-precision base: a plain transformers model."""
    adapter = module.model
    base = _full_precision_base(module, dtype)
    if module.hparams.adapter.get("quantization"):
        dequantize_into(module, base)
    fresh = get_peft_model(base, adapter.peft_config["default"])
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(adapter))
    merged = fresh.merge_and_unload()
    merged.config.use_cache = True
    return merged


@torch.no_grad()
def compare(
    reference: Callable[[torch.Tensor], torch.Tensor],
    candidate: Callable[[torch.Tensor], torch.Tensor],
    batches: Sequence[dict[str, torch.Tensor]],
) -> dict[str, float]:
    """Validation loss of both models and mean KL(reference || candidate) per labelled token."""
    sums = {"reference": 0.0, "candidate": 0.0, "kl": 0.0}
    tokens = 0
    for batch in batches:
        ref, cand = reference(batch).float(), candidate(batch).float()
        labels = batch["labels"].to(ref.device)
        for key, logits in (("reference", ref), ("candidate", cand)):
            sums[key] += float(token_loss_sum(logits, labels)[0])
        mask = labels[:, 1:] != IGNORE_INDEX
        ref_logp = torch.log_softmax(ref[:, :-1][mask], -1)
        cand_logp = torch.log_softmax(cand[:, :-1][mask], -1)
        sums["kl"] += float((ref_logp.exp() * (ref_logp - cand_logp)).sum())
        tokens += int(mask.sum())
    return {
        "val/loss_adapter": sums["reference"] / tokens,
        "val/loss_merged": sums["candidate"] / tokens,
        "loss_delta": abs(sums["candidate"] - sums["reference"]) / tokens,
        "kl_mean": sums["kl"] / tokens,
    }


def export(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Merge, save, reload and check; returns the fidelity figures (also in fidelity.json)."""
    cfg, module, datamodule, checkpoint = load_trained(cfg, overrides)
    if checkpoint.kind == "none":
        raise ExportError("ckpt=none has no adapter to merge; name a run, adapter or .ckpt")
    dtype = getattr(torch, cfg.export.dtype)
    beside = checkpoint.run_dir or Path(cfg.output_dir)
    out = Path(cfg.export.output_dir or beside / "merged")
    merged_model(module, dtype).save_pretrained(out)
    datamodule.tokenizer.save_pretrained(out)
    device = module.load_device
    # On a CPU the saved weights are compared in fp32 (bf16 matmuls there are slow and coarse);
    # on a GPU in the dtype they were saved in, as users will load them.
    compare_dtype = torch.float32 if device.type == "cpu" else dtype
    reloaded = AutoModelForCausalLM.from_pretrained(
        out, dtype=compare_dtype, device_map={"": device}
    ).eval()
    datamodule.setup("validate")
    batches = list(datamodule.val_dataloader()) or list(datamodule.train_dataloader())[:4]

    def run(model: Callable) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        def logits(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            def on_device(key: str) -> torch.Tensor | None:
                value = batch.get(key)
                return None if value is None else value.to(device)

            return model(
                input_ids=on_device("input_ids"),
                attention_mask=on_device("attention_mask"),
                position_ids=on_device("position_ids"),
                use_cache=False,
            ).logits

        return logits

    fidelity = compare(run(module.model), run(reloaded), batches)
    (out / "fidelity.json").write_text(json.dumps(fidelity, indent=2) + "\n")
    log.info("exported %s: %s", out, fidelity)
    if (
        fidelity["kl_mean"] > cfg.export.max_kl
        or fidelity["loss_delta"] > cfg.export.max_loss_delta
    ):
        raise ExportError(
            f"the merged model in {out} drifts from the adapter model: KL {fidelity['kl_mean']:.2e}"
            f" (max {cfg.export.max_kl}), loss difference {fidelity['loss_delta']:.2e} (max "
            f"{cfg.export.max_loss_delta}); try export.dtype=float32"
        )
    return fidelity
