"""What one training step keeps for backward, per lorafit path: the memory side of the levers.

    python bench/saved_activations.py                       # the four paths of docs/benchmarks.md
    python bench/saved_activations.py model.attn_implementation=sdpa_packed   # any overrides
    python bench/saved_activations.py adapter=qlora model.dtype=bfloat16 trainer=cpu_bf16

SmolLM2-135M-Instruct with the quickstart's LoRA (r=16, alpha 32, dropout 0.05), one packed
512-token row of the real alpaca rows (the built-in demo rows when ../shared/data is absent),
under bf16 autocast when the trainer's precision is bf16-mixed.
Tensors are counted once per storage through `torch.autograd.graph.saved_tensors_hooks`, the
frozen weights left out: deterministic, so a busy host does not blur it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lorafit.data.examples import PackedExamples, TokenizedExamples
from lorafit.data.packing import pack_rows, packed_collate
from lorafit.data.sources import load_rows
from lorafit.data.tokenization import tokenize_rows
from lorafit.model.lora_dropout import DropoutLinear
from lorafit.model.module import CausalLMModule

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"
SDPA = "model.attn_implementation=sdpa"  # transformers' own attention, the block mask
PATHS = {
    "plain (full-vocabulary logits, peft's dropout)": ["model.loss_chunk_size=null", SDPA],
    "fused loss": [SDPA],
    "fused loss + dropout inside lora_A": [SDPA],
    "the same with sdpa_packed (the default)": ["model.attn_implementation=sdpa_packed"],
}


def saved_megabytes(overrides: list[str], fuse_dropout: bool) -> float:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=quickstart", *overrides])
    tokenizer = instantiate(cfg.model.source).load_tokenizer()
    source = str(SHARED) if SHARED.is_file() else "builtin:demo_alpaca"
    examples, _ = tokenize_rows(load_rows([{"path": source}])[:200], tokenizer, 512)
    flat = TokenizedExamples.from_lists(examples)
    row = PackedExamples(flat, pack_rows(flat.lengths().tolist(), 512))[0]
    module = CausalLMModule(model=cfg.model, adapter=cfg.adapter, optimizer={}, scheduler={})
    module.configure_model()
    if not fuse_dropout:  # peft's own path: its Dropout before a plain lora_A
        for layer in module.model.modules():
            for name, lora_a in list(getattr(layer, "lora_A", {}).items()):
                if isinstance(lora_a, DropoutLinear):
                    plain = torch.nn.Linear(lora_a.in_features, lora_a.out_features, bias=False)
                    plain.weight = lora_a.weight
                    layer.lora_A[name] = plain
                    layer.lora_dropout[name] = torch.nn.Dropout(lora_a.p)
    module.train()
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    half = str(cfg.trainer.precision).startswith("bf16")
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=half),
    ):
        module._loss_sum(packed_collate([row], pad_token_id=tokenizer.pad_token_id))
    return sum(size for ptr, size in seen.items() if ptr not in weights) / 1e6


def main() -> None:
    if len(sys.argv) > 1:
        print(f"{saved_megabytes(sys.argv[1:], True):.0f} MB kept for backward")
        return
    print("| lorafit path | kept for backward |\n| --- | --- |")
    for number, (name, overrides) in enumerate(PATHS.items()):
        print(f"| {name} | {saved_megabytes(overrides, fuse_dropout=number >= 2):.0f} MB |")


if __name__ == "__main__":
    main()
