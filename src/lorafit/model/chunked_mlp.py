"""`model.mlp_chunk_tokens`: each decoder layer's MLP runs over a micro-batch's tokens a chunk
at a time, so that its widest activations and their gradients exist for one chunk at a time.

The MLP is the widest part of a layer (14,336 values a token for Mistral-7B against 4,096),
and under peft's fp32 stream its projections' outputs and gradients are fp32: 448 MiB each at
8192 tokens. The canonical job's memory peak is the MLP's backward in the recomputed layer,
where five of them are alive at once (`python bench/peak_memory.py --at-peak --sequence-len
8192 --layers 2`). The MLP treats each token apart, so it can run on slices of the tokens: in
forward (and gradient checkpointing's recomputation) each chunk is its own call, and autograd
records a graph per chunk; in backward it runs the chunks' graphs one after another, latest
first, freeing each chunk's gradients and kept activations as it goes. What the chunks keep for
backward still adds up to what one call keeps (`gate` and `up` for SwiGLU), and it is all
alive when the recomputation ends, which becomes the peak: only the gradients made in
backward shrink to a chunk's, about 0.45 GiB less at 8192 tokens in chunks of 2048
(docs/benchmarks.md). Keeping less would take recomputing each chunk once more in backward,
a third forward pass of the MLP.

The same numbers up to rounding: each token's forward is the same arithmetic, and the LoRA
weights' gradients are sums over the chunks instead of one product's sum over all tokens.
With LoRA dropout each chunk draws its own masks (the same probability, other draws), so a
run's losses are not those of an unchunked run with the same seed. The price is host work:
the MLP's operators run once a chunk, which is why this is off by default and chunks are
large (it pays where the step waits on the GPU, at thousands of tokens a micro-batch).
Training only, as `model.compile`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

# The projections of the dense gated MLPs this knows (Llama, Mistral, Qwen2 and their kin).
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class ChunkedForward:
    """An MLP's forward over at most `tokens` tokens a call: `chunk` is its own forward (eager,
    or compiled by `model.compile`), called on consecutive slices of the flattened tokens."""

    def __init__(self, chunk: Callable[[torch.Tensor], torch.Tensor], tokens: int):
        self.chunk = chunk
        self.tokens = tokens

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        count = x.numel() // x.shape[-1]
        if count <= self.tokens:
            return self.chunk(x)
        # One row of all the tokens, cut along it: each slice is a view, and the slices'
        # input gradients come back together through split's one backward node.
        parts = [self.chunk(part) for part in x.reshape(1, count, -1).split(self.tokens, dim=1)]
        return torch.cat(parts, dim=1).view(*x.shape[:-1], parts[0].shape[-1])


def _is_dense_mlp(name: str, module: nn.Module) -> bool:
    return "mlp" in name and all(
        isinstance(getattr(module, p, None), nn.Module) for p in PROJECTIONS
    )


def chunk_mlps(model: nn.Module, tokens: int) -> int:
    """Give each decoder layer's dense MLP a forward over `tokens` tokens a call (its own
    forward, whatever it is: transformers', lorafit's SwiGLU or Liger's); returns how many."""
    chunked = 0
    for layer in (m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)):
        for name, child in layer.named_children():
            if _is_dense_mlp(name, child) and not isinstance(child.forward, ChunkedForward):
                child.forward = ChunkedForward(child.forward, tokens)
                chunked += 1
    return chunked


def compile_chunks(module: nn.Module, mode: str | None = None) -> bool:
    """For `model.compile`: compile a chunked MLP's per-chunk forward, not the loop over the
    chunks, so that every chunk of one size shares a graph and autograd still runs the chunks
    apart; returns whether `module` was a chunked MLP."""
    forward = vars(module).get("forward")
    if not isinstance(forward, ChunkedForward):
        return False
    forward.chunk = torch.compile(forward.chunk, mode=mode)
    return True
