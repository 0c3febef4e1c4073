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

Why: at 2048 tokens an H200 spends half of a QLoRA step waiting for the host to dispatch some
17,000 kernels, and over half of its own time in casts and elementwise passes, not matrix
products (docs/benchmarks.md); fusing is the lever for both.
"""

from __future__ import annotations

import torch
from transformers.modeling_layers import GradientCheckpointingLayer


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Compile, in place, each decoder layer's children but its attention; returns how many
    modules were compiled."""
    import torch._inductor.config as inductor

    # The dropout masks must stay those of eager torch (and peft): random draws go to torch's
    # own generator, never inductor's (tests/model/test_compiled_layers.py).
    inductor.fallback_random = True
    compiled = 0
    for layer in (m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)):
        for name, child in layer.named_children():
            attention = "attn" in name or "attention" in name
            # The attention's projections, not the attention: see the module's docstring.
            for module in child.children() if attention else [child]:
                module.compile()
                compiled += 1
    return compiled
