"""The embedding and output layer of a quantized base kept in the dtype they loaded in.

peft's recipe for a 4- or 8-bit base (`prepare_model_for_kbit_training`) casts every weight left
unquantized to fp32. For the norms that is where precision is won: they compute on the fp32
residual stream. The embedding and the output layer gain nothing: a model loaded in bf16 holds
bf16 values, an fp32 copy adds no digits, and under autocast the output layer's matmul casts
its weight back to bf16 on every call. For Mistral-7B the two fp32 copies are 0.98 GiB of a
QLoRA step's 6.7 GiB at 2048 tokens (docs/benchmarks.md).

Here the two keep their loaded dtype and compute what the fp32 copies would:
- the embedding returns its rows widened to fp32, the very values of the fp32 copy (widening
  is exact), so the residual stream is fp32 as under peft's recipe;
- the output layer, under autocast, hands autocast the bf16 weight it would have cast the copy
  to; outside autocast it multiplies in its input's dtype with the weight widened for the call.
Losses and gradients are bit for bit those of peft's fp32 copies
(`tests/model/test_loaded_embeddings.py`). Only plain `nn.Embedding` / `nn.Linear` layers are
kept (a scaled embedding would round its product in bf16), and tied weights only when both
layers qualify.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HALF = (torch.float16, torch.bfloat16)


def as_multiplied(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A kept half weight as a product with x takes it: as it is under autocast (which casts
    both), else widened to x's dtype for the call, as an fp32 copy would have been."""
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return weight.to(x.dtype)
    return weight


class LoadedDtypeLinear(nn.Linear):
    """An output layer whose weight stays in a half dtype below an fp32 model; the class the
    output layer is switched to (same state, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else as_multiplied(self.bias, x)
        return F.linear(x, as_multiplied(self.weight, x), bias)


def _widen(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.to(torch.float32)


def _qualifies(layer: nn.Module | None, kind: type, loaded: dict[int, torch.dtype]) -> bool:
    if type(layer) is not kind:
        return False
    weights = layer.parameters(recurse=False)
    return all(loaded.get(id(p)) in HALF and p.dtype == torch.float32 for p in weights)


def keep_embeddings_as_loaded(model: nn.Module, loaded: dict[str, torch.dtype]) -> list[str]:
    """Put the fp32 copies of the input embedding and output layer back in their loaded dtype
    (`loaded`: parameter name to dtype before peft's recipe), computing as the copies did;
    returns which of the two were kept."""
    by_id = {id(p): loaded[name] for name, p in model.named_parameters() if name in loaded}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    keep = {
        "embedding": _qualifies(embedding, nn.Embedding, by_id),
        "output layer": _qualifies(head, nn.Linear, by_id),
    }
    tied = embedding is not None and head is not None and embedding.weight is head.weight
    if tied and not all(keep.values()):
        return []
    for name, layer in (("embedding", embedding), ("output layer", head)):
        if not keep[name]:
            continue
        for p in layer.parameters(recurse=False):
            # Back from peft's fp32 copy: exact, every value came from this dtype.
            p.data = p.data.to(by_id[id(p)])
    if keep["embedding"]:
        # First among the embedding's hooks: peft's, which makes its output require grad
        # for checkpointing, then sees the fp32 rows, as it did the fp32 copy's.
        embedding.register_forward_hook(_widen, prepend=True)
    if keep["output layer"]:
        head.__class__ = LoadedDtypeLinear
    return [name for name, kept in keep.items() if kept]
