"""`model.compile`: the compiled MLPs, norms and attention projections of a QLoRA model train
what the eager ones train, dropout masks included, under bf16 autocast as on a GPU; validation
and the packing preflight run eager; the eval tools run the model uncompiled."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch._dynamo.utils
from transformers import AttentionInterface
from transformers.models.mistral import modeling_mistral

from helpers import TINY, compose_config, configure_as_fit_does, logged, packed_test_module
from lorafit.model import packed_attention
from lorafit.model.module import CausalLMModule
from lorafit.training import build_run


class _SeesRotary(pl.Callback):
    """Records which rotary function the attention's module holds while the run trains."""

    def __init__(self) -> None:
        self.seen: set[object] = set()

    def on_train_batch_end(self, *args) -> None:
        self.seen.add(modeling_mistral.apply_rotary_pos_emb)


def _fit(overrides: list[str], out, watch: pl.Callback | None = None):
    run = build_run(compose_config([*TINY, "trainer.max_steps=3", *overrides], out))
    if watch is not None:
        run.trainer.callbacks.append(watch)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return run.module


def test_compiled_layers_train_what_eager_layers_train(tmp_path):
    # bf16 autocast as on a GPU, and dropout high enough that other masks would move the
    # losses of steps 2 and 3 far past rounding: the compiled MLPs must draw from torch's own
    # random stream, in the eager order.
    # 4-bit as the canonical job: bitsandbytes' matmul inside the compiled graphs.
    common = ["trainer=cpu_bf16", "adapter=qlora", "adapter.dropout=0.5"]
    eager_rotary = modeling_mistral.apply_rotary_pos_emb
    eager = _fit(common, tmp_path / "eager")
    rotary = _SeesRotary()
    limit = torch._dynamo.config.recompile_limit
    with _recompile_limit_hits() as hits:
        compiled = _fit([*common, "model.compile=true"], tmp_path / "compiled", rotary)
    # Rows of varying length: past torch's 8 graphs a function the projections' further
    # variants ran eager (`allow_recompiles`), and the limit is torch's again after the run.
    assert hits == []
    assert torch._dynamo.config.recompile_limit == limit
    # The attention's rotary embedding ran compiled, and the eager one is back after the run.
    (trained_with,) = rotary.seen
    assert trained_with is not eager_rotary
    assert modeling_mistral.apply_rotary_pos_emb is eager_rotary
    layers = compiled.model.get_base_model().model.layers
    assert all(layer.mlp._compiled_call_impl is not None for layer in layers)
    assert all(layer.self_attn._compiled_call_impl is None for layer in layers)
    # Both norms, the one named after the attention included.
    norms = [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    assert all(n._compiled_call_impl is not None for n in norms)
    projections = [p for layer in layers for p in layer.self_attn.children()]
    assert len(projections) == 4 * len(layers)
    assert all(p._compiled_call_impl is not None for p in projections)
    assert eager.model.get_base_model().model.layers[0].mlp._compiled_call_impl is None
    # Validation compiles nothing: its rows, of other lengths and in eval mode, would spend
    # the compiler's recompile limit that the training graphs need.
    layer = layers[0]
    captured = torch._dynamo.utils.counters["stats"]["calls_captured"]
    compiled.on_validation_start()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer.mlp(torch.randn(1, 5, layer.mlp.gate_proj.in_features))
    compiled.on_validation_end()
    assert torch._dynamo.utils.counters["stats"]["calls_captured"] == captured
    _assert_same_losses(tmp_path)


@contextlib.contextmanager
def _recompile_limit_hits():
    """The compiled functions torch warns have reached its recompile limit meanwhile."""
    sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
    from peer_worker import RecompileLimits

    limits = RecompileLimits()
    logger = logging.getLogger(RecompileLimits.LOGGER)
    logger.addHandler(limits)
    try:
        yield limits.functions
    finally:
        logger.removeHandler(limits)


def _assert_same_losses(out) -> None:
    for key in ("train/loss", "val/loss"):
        expected = torch.tensor(logged(out / "eager", key))
        # Fused kernels round bf16 in another order (2e-5 apart here); other masks: 1e-3 apart.
        torch.testing.assert_close(
            torch.tensor(logged(out / "compiled", key)), expected, rtol=2e-4, atol=0
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_compiled_layers_train_what_eager_layers_train(tmp_path):
    # Triton's kernels and CUDA's random stream: model.compile failed on an H200 before.
    common = ["trainer=gpu", "adapter=qlora", "adapter.dropout=0.5"]
    _fit(common, tmp_path / "eager")
    _fit([*common, "model.compile=true"], tmp_path / "compiled")
    _assert_same_losses(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dequantize", ["bitsandbytes", "compiled"])
def test_on_a_gpu_whole_compiled_layers_train_what_eager_layers_train(tmp_path, dequantize):
    # Triton's kernels, CUDA's random stream and torch's varlen attention between the graphs;
    # with `model.dequantize=compiled`, the 4-bit weights' dequantization in the graphs too.
    common = ["trainer=gpu", "adapter=qlora", "adapter.dropout=0.5"]
    common += ["model.gradient_checkpointing=true", "model.source.num_hidden_layers=4"]
    _fit(common, tmp_path / "eager")
    compiled = ["model.compile=true", "model.compile_scope=layers"]
    _fit([*common, *compiled, f"model.dequantize={dequantize}"], tmp_path / "compiled")
    _assert_same_losses(tmp_path)


def test_a_compiled_fit_stopped_by_an_error_puts_the_eager_rotary_back(tmp_path):
    eager_rotary = modeling_mistral.apply_rotary_pos_emb

    class Fails(pl.Callback):
        def on_train_batch_end(self, *args) -> None:
            assert modeling_mistral.apply_rotary_pos_emb is not eager_rotary  # compiled
            raise RuntimeError("stopped")

    run = build_run(compose_config([*TINY, "trainer=cpu_bf16", "model.compile=true"], tmp_path))
    run.trainer.callbacks.append(Fails())
    with pytest.raises(RuntimeError, match="stopped"):
        run.trainer.fit(run.module, datamodule=run.datamodule)
    assert modeling_mistral.apply_rotary_pos_emb is eager_rotary


def test_the_eval_tools_run_the_model_uncompiled():
    """eval, generate and export build the module with no trainer fitting it."""
    cfg = compose_config([*TINY, "model.compile=true"])
    module = CausalLMModule(model=cfg.model, adapter=cfg.adapter, optimizer={}, scheduler={})
    module.configure_model()
    assert module.model.get_base_model().model.layers[0].mlp._compiled_call_impl is None


@pytest.mark.parametrize("dequantize", ["bitsandbytes", "compiled"])
def test_the_gpu_s_one_pass_forms_compile_without_graph_breaks(monkeypatch, dequantize):
    """On a GPU the LoRA branch takes other forms than on a CPU (`lora_dropout.one_pass`); a
    value read off a tensor (`.item()`) or a tensor made and cached while tracing would break
    the compiled projection's graph or fail it. With `model.dequantize=compiled` the weight's
    dequantization is traced into the same graph."""
    import sys
    from pathlib import Path

    from lorafit.model import lora_dropout
    from lorafit.model.lora_branch import dequantize_in_torch

    sys.path.insert(0, str(Path(__file__).parent))
    from test_lora_branch import _model

    monkeypatch.setattr(lora_dropout, "CPU_FORM_DEVICES", frozenset())
    model = _model(0.3, True)
    if dequantize == "compiled":
        assert dequantize_in_torch(model) == 2
    down = model.base_model.model.down
    x = torch.randn(2, 7, 128, requires_grad=True)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(down)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    results = []
    for layer in (down, torch.compile(down)):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = layer(x).float().square().sum()
        results.append([loss, *torch.autograd.grad(loss, [x, down.lora_A.default.weight])])
    torch._dynamo.reset()
    torch.testing.assert_close(results[1], results[0], rtol=1e-3, atol=0)


def test_the_compiled_branch_reinterprets_no_bool_as_bytes(monkeypatch):
    """The dropout mask was drawn as bool and viewed as uint8: torch 2.11's Inductor cannot
    lower that view (torch 2.13's can), and `model.compile` failed on an H200 under it. The
    graphs the compiler receives, forward and backward, hold no dtype view at all."""
    import sys
    from pathlib import Path

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from lorafit.model import lora_dropout

    sys.path.insert(0, str(Path(__file__).parent))
    from test_lora_branch import _model

    monkeypatch.setattr(lora_dropout, "CPU_FORM_DEVICES", frozenset())
    graphs = []

    def keep(graph, _inputs):
        graphs.append(graph)
        return make_boxed_func(graph.forward)

    down = _model(0.3, True).base_model.model.down
    x = torch.randn(2, 7, 128, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(down, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(x).float().square().sum().backward()
    torch._dynamo.reset()
    assert len(graphs) == 2  # forward and backward
    targets = {node.target for graph in graphs for node in graph.graph.nodes}
    # The mask: bernoulli, or lorafit's ordered draw of it once a model was compiled in this
    # process (`lora_dropout.order_compiled_draws`; a functionalized call names it in its args).
    called = {str(t) for t in targets} | {
        str(node.args[0]) for graph in graphs for node in graph.graph.nodes if node.args
    }
    assert any("bernoulli" in name or "ordered_mask" in name for name in called), called
    assert torch.ops.aten.view.dtype not in targets


def test_compiled_the_norms_and_the_branch_take_their_plain_forms(monkeypatch):
    """Two of lorafit's eager forms gave wrong gradients under torch 2.11's compiler (the GPU
    machines' torch; later versions compile both right): RMSNorm's function, whose x enters
    twice, lost one of x's gradients, and the LoRA branch's one-pass GPU forms made x's
    gradient zero. Compiled, both take the plain forms, which the compiler fuses anyway."""
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    from lorafit.model import lora_dropout
    from lorafit.model.rms_norm import fuse_rms_norm

    monkeypatch.setattr(lora_dropout, "CPU_FORM_DEVICES", frozenset())
    seen = []

    @torch.compile(backend="eager", fullgraph=True)
    def forms(x):
        seen.append(lora_dropout.one_pass(x.device))
        return x + 1

    forms(torch.zeros(1))
    assert seen == [False] and lora_dropout.one_pass(torch.device("cpu"))

    norm = torch.nn.Sequential(MistralRMSNorm(8))
    norm[0].weight.requires_grad_(False)
    assert fuse_rms_norm(norm) == 1
    graphs = []

    def keep(graph, _inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(norm, backend=keep, fullgraph=True)
    compiled(torch.randn(3, 8, requires_grad=True)).sum().backward()
    torch._dynamo.reset()
    targets = {str(node.target) for node in graphs[0].graph.nodes}
    assert not any("autograd_function_apply" in target for target in targets), targets
    assert "rsqrt" in str(targets)


def test_compile_mode_reaches_every_compiled_function(monkeypatch):
    modes = []
    compile = torch.compile

    def recording(*args, **kwargs):
        modes.append(kwargs.get("mode"))
        return compile(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording)
    overrides = (
        "adapter=qlora",
        "model.compile=true",
        "model.compile_mode=max-autotune-no-cudagraphs",
    )
    module = packed_test_module(overrides=overrides)
    module.model = None
    configure_as_fit_does(module)
    module.teardown("fit")
    # Per layer (2): q, k, v, o, the MLP and two norms; and the rotary embedding, once.
    assert modes == ["max-autotune-no-cudagraphs"] * (2 * 7 + 1)


class _SeesWholeLayers(pl.Callback):
    """Records, while the run trains, whether each decoder layer runs lorafit's compiled forward
    and how many times a step the layers went through their gradient checkpoint."""

    def __init__(self) -> None:
        self.compiled: set[bool] = set()
        self.checkpointed: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        layers = pl_module.model.get_base_model().model.layers
        self.compiled |= {"forward" in vars(layer) for layer in layers}
        self.calls = 0
        for layer in layers:
            if not hasattr(layer, "_counted"):
                layer._counted = True
                through = layer._gradient_checkpointing_func

                def counted(*args, through=through, **kwargs):
                    self.calls += 1
                    return through(*args, **kwargs)

                layer._gradient_checkpointing_func = counted

    def on_train_batch_end(self, *args) -> None:
        self.checkpointed.append(self.calls)


def test_whole_compiled_layers_train_what_eager_layers_train(tmp_path):
    # As above, with each layer's forward one compiled function (two graphs around the eager
    # attention core), through its reentrant gradient checkpoint.
    common = [
        "trainer=cpu_bf16",
        "adapter=qlora",
        "adapter.dropout=0.5",
        "model.gradient_checkpointing=true",
        "model.source.num_hidden_layers=4",
    ]
    _fit(common, tmp_path / "eager")
    attention = AttentionInterface._global_mapping[packed_attention.NAME]
    seen = _SeesWholeLayers()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = _fit(
        [*common, "model.compile=true", "model.compile_scope=layers"], tmp_path / "compiled", seen
    )
    assert seen.compiled == {True}
    assert seen.checkpointed == [4] * len(seen.checkpointed) and seen.checkpointed
    # The layers share their graphs: two for each of the forward's variants (without autograd,
    # recomputed, the first layer's), 12 at most whatever the depth. Graphs made a
    # layer would spend torch's recompile limit (8 a function) long before the canonical 32
    # layers, leaving the rest eager.
    made = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    assert 2 <= made <= 12, made
    # After the run: transformers' own forward and attention again, for eval and export.
    model_layers = compiled.model.get_base_model().model.layers
    assert all("forward" not in vars(layer) for layer in model_layers)
    assert AttentionInterface._global_mapping[packed_attention.NAME] is attention
    _assert_same_losses(tmp_path)
