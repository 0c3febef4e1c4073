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

That is `model.compile_scope=modules`. With `layers`, each decoder layer's forward is compiled
whole instead (`compile_whole_layers`), around the same eager attention core. In either scope a
graph may hold several dropouts (the MLP's three; a whole layer's seven), whose masks are drawn
in eager order (`lora_dropout.order_compiled_draws`): left to the compiler's scheduling, a whole
layer's masks went to other projections than eager's, and the gradients with them.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.modeling_layers import GradientCheckpointingLayer

from lorafit.model import packed_attention
from lorafit.model.chunked_mlp import compile_chunks
from lorafit.model.lora_dropout import order_compiled_draws

# Whether this transformers checkpoints a decoder layer in its __call__ (before 5.2x; the GPU
# machines' 5.17) rather than in its forward.
CHECKPOINTS_IN_CALL = "__call__" in vars(GradientCheckpointingLayer)
# The module-level function transformers' attention modules apply the rotary embedding with.
ROTARY = "apply_rotary_pos_emb"


# Graphs torch keeps for one compiled function (its default: 8) while lorafit's compiled layers
# train. In the modules scope a projection's forward is one function for all of a model's
# adapted layers, with a graph per weight shape (q and o, k and v, gate and up, down), input dtype
# (o_proj's) and autograd state (without autograd, recomputed, the first layer's): 8 for the
# canonical job, whose rows are all one length. Rows of varying length add a graph of dynamic
# shape to each (CPU suite's tiny model: over the limit). Past it a variant runs eager, silently.
RECOMPILE_LIMIT = 32


def allow_recompiles(limit: int = RECOMPILE_LIMIT) -> Callable[[], None]:
    """Raise torch's recompile limit to `limit` for the process; returns what puts it back."""
    import torch._dynamo.config as dynamo

    before = dynamo.recompile_limit
    dynamo.recompile_limit = max(before, limit)

    def undo() -> None:
        dynamo.recompile_limit = before

    return undo


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
    _order_draws(model)
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


def compile_whole_layers(model: torch.nn.Module, mode: str | None = None) -> Callable[[], None]:
    """`model.compile_scope=layers`: each decoder layer's forward compiled as a whole (inside its
    gradient checkpoint), in torch.compile's `mode`; returns what undoes it.

    The modules scope enters eight compiled modules a layer, three times a step (forward,
    recomputation, backward), each through its own guards and runtime wrappers; at 2048 tokens
    a GPU waits on that host work (docs/benchmarks.md). Here a layer is two graphs: the input
    norm, projections and rotary embedding up to the attention core, and from the attention's
    output projection to the layer's end (its residual adds, second norm and MLP fused with
    their neighbours). The attention core between them stays eager for `sdpa_packed`'s reason
    (module docstring): it is registered here as a function the compiler does not enter, and
    the compiler resumes after it inside the same layer (`nested_graph_breaks`, where this
    torch has it; otherwise the attention module's forward is a third graph).

    The layers share one compiled function (the layer class's forward, without transformers'
    wrappers, whose code other layers' forwards share): its variants are the forward without
    autograd (reentrant checkpointing), the recomputation, and the first layer's forward,
    whose input needs no gradient. Random draws stay torch's own, as in the modules scope.
    """
    import torch._dynamo.config as dynamo
    import torch._inductor.config as inductor

    inductor.fallback_random = True
    _order_draws(model)
    nested = getattr(dynamo, "nested_graph_breaks", None)
    if nested is not None:
        dynamo.nested_graph_breaks = True
    eager_attention = AttentionInterface._global_mapping.get(packed_attention.NAME)
    if eager_attention is not None:
        AttentionInterface.register(packed_attention.NAME, torch.compiler.disable(eager_attention))
    compiled: dict[type, Callable] = {}
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        cls = type(layer)
        if cls not in compiled:
            compiled[cls] = torch.compile(inspect.unwrap(cls.forward), mode=mode)
        # On the instance. transformers 5.2x checkpoints a layer in its class's forward, which
        # this replaces (calling the class's own forward it closes over); earlier versions
        # checkpoint in the layer's __call__, which then calls this.
        forward = compiled[cls] if CHECKPOINTS_IN_CALL else _checkpointed(compiled[cls])
        layer.forward = types.MethodType(forward, layer)

    def undo() -> None:
        for layer in layers:
            del layer.forward
        if eager_attention is not None:
            AttentionInterface.register(packed_attention.NAME, eager_attention)
        if nested is not None:
            dynamo.nested_graph_breaks = nested

    return undo


def _checkpointed(forward: Callable) -> Callable:
    """A decoder layer's forward through its gradient checkpoint, as transformers' wrapper
    does it for training (caches are off there), calling `forward` for the layer's own."""

    def layer_forward(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            layer = functools.partial(forward, self, **kwargs)
            return self._gradient_checkpointing_func(layer, *args)
        return forward(self, *args, **kwargs)

    return layer_forward


def _order_draws(model: torch.nn.Module) -> None:
    """The compiled dropout masks drawn in eager order on each device the model's weights are on
    (`lora_dropout.order_compiled_draws`)."""
    for device in {p.device for p in model.parameters()}:
        order_compiled_draws(device)
