"""`model.compile`: the MLP and norms of each decoder layer compiled with torch.compile.

A decoder layer with LoRA on every projection is hundreds of small operations a step: the
norms' fp32 chain, SwiGLU, and per adapted layer the dropout, two thin matmuls, a scale and an
add, each a pass over the activations and a kernel launch. Inductor fuses the elementwise ones
into few kernels. The MLP holds three of the seven adapted projections and the widest
activations (14,336 a token for Mistral-7B against 4,096).

Compiled: every child of a decoder layer but its attention module, and the attention's own
projections (q, k, v, o: four of the seven adapted layers, each a 4-bit or plain matmul with
its LoRA, dropout, scale, add and casts around it). The attention module itself stays eager
because `sdpa_packed` finds each packed row's examples on the host, which a compiled graph
would specialise on (one graph per row layout), and because transformers wraps the attention's
forward in a decorator whose code other layers share, which sends the compiler recompiling.
Every layer has the same code and shapes, so the layers share their graphs (the MLP's, and one
per projection shape); gradient checkpointing recomputes the compiled modules as it does eager
ones. Random draws (the LoRA dropout masks) stay torch's own, so the compiled layers draw the
masks eager ones draw. Training only (`CausalLMModule`): eval, generate and export run the
plain model.

The rotary embedding the attention applies to its queries and keys is compiled too: a
function its module calls by name (`apply_rotary_pos_emb` in transformers' model files), so it
is replaced in that module, for the process, while the run trains (`compile_rotary`, undone at
the run's end). Eager, it is five passes over each query and key, each written out (the
product by cos, the negated half, the concatenation, the product by sin, the sum), where one
fused pass reads them once; on the fp32 queries of Mistral-7B at 8192 tokens, 128 MiB a layer,
that is about 140 GB of a step's memory traffic by count (docs/benchmarks.md).

Why: at 2048 tokens an H200 spends half of a QLoRA step waiting for the host to dispatch some
17,000 kernels, and over half of its own time in casts and elementwise passes, not matrix
products (docs/benchmarks.md); fusing is the lever for both.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from lorafit.model.chunked_mlp import compile_chunks

# The module-level function transformers' attention modules apply the rotary embedding with.
ROTARY = "apply_rotary_pos_emb"


def _is_attention(name: str) -> bool:
    # Not the norms named after it (Mistral's and Llama's post_attention_layernorm).
    return ("attn" in name or "attention" in name) and "norm" not in name


def compile_decoder_layers(model: torch.nn.Module, mode: str | None = None) -> int:
    """Compile, in place, each decoder layer's children but its attention, in torch.compile's
    `mode` (`model.compile_mode`); returns how many modules were compiled."""
    import torch._inductor.config as inductor

    # The dropout masks must stay those of eager torch (and peft): random draws go to torch's
    # own generator, never inductor's (tests/model/test_compiled_layers.py).
    inductor.fallback_random = True
    compiled = 0
    for layer in (m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)):
        for name, child in layer.named_children():
            attention = _is_attention(name)
            # The attention's projections, not the attention: see the module's docstring.
            for module in child.children() if attention else [child]:
                if not compile_chunks(module, mode):  # a chunked MLP: its chunks' forward
                    module.compile(mode=mode)
                compiled += 1
    return compiled


def compile_rotary(model: torch.nn.Module, mode: str | None = None) -> Callable[[], None]:
    """Replace the rotary embedding function of the modules that define the model's attention
    with its compiled form, for the process; returns what undoes it. The compiled function runs
    eager under the `force_eager` stance, as validation takes it (`CausalLMModule`)."""
    replaced: list[tuple[object, Callable]] = []
    for layer in (m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)):
        for name, child in layer.named_children():
            code = sys.modules.get(type(child).__module__)
            original = getattr(code, ROTARY, None)
            if not _is_attention(name) or original is None or any(c is code for c, _ in replaced):
                continue
            setattr(code, ROTARY, torch.compile(original, mode=mode))
            replaced.append((code, original))

    def undo() -> None:
        for code, original in replaced:
            setattr(code, ROTARY, original)

    return undo
