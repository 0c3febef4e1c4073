"""Adapter shapes and parameter counts, every adapter option training, and the
bitsandbytes preflight."""

from __future__ import annotations

import sys

import pytest
import torch
from hydra.utils import instantiate
from transformers import MistralConfig, MistralForCausalLM

from helpers import TINY, assert_bitwise_equal, compose_config, logged, packed_test_module
from lorafit.errors import QuantizationUnavailableError
from lorafit.model.adapters import trainable_parameters
from lorafit.model.module import CausalLMModule
from lorafit.training import build_run, train


def _lora(overrides: list[str]):
    return instantiate(compose_config(overrides).adapter)


def test_lora_r8_on_all_linear_layers_of_tiny_mistral_has_exact_count():
    model = instantiate(compose_config(TINY).model.source).load_model(
        dtype=torch.float32, quantization_config=None, attn_implementation="sdpa", device_map=None
    )
    peft_model = _lora(["adapter.r=8"]).apply(model, gradient_checkpointing=False)
    # Per layer, r x (in + out) for each projection: q 64->64, k and v 64->32, o 64->64,
    # gate and up 64->128, down 128->64; two layers.
    per_layer = 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128))
    assert trainable_parameters(peft_model)["trainable"] == 2 * per_layer == 16384
    names = {n.split(".")[-4] for n, p in peft_model.named_parameters() if p.requires_grad}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_article_lora_on_mistral_7b_shape_has_exact_count():
    with torch.device("meta"):
        model = MistralForCausalLM(MistralConfig())  # the Mistral-7B-v0.1 architecture
    peft_model = _lora(["adapter=qlora"]).apply(model, gradient_checkpointing=False)
    per_layer = 32 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert trainable_parameters(peft_model)["trainable"] == 32 * per_layer == 83_886_080


def test_explicit_target_modules_restrict_the_adapter():
    with torch.device("meta"):
        model = MistralForCausalLM(MistralConfig(num_hidden_layers=1))
    adapter = _lora(
        ["adapter.r=4", "adapter.target_linear=false", "adapter.target_modules=[q_proj,v_proj]"]
    )
    peft_model = adapter.apply(model, gradient_checkpointing=False)
    assert trainable_parameters(peft_model)["trainable"] == 4 * ((4096 + 4096) + (4096 + 1024))


@pytest.mark.parametrize("adapter", ["lora", "qlora", "lora_8bit", "none"])
def test_every_adapter_trains_and_exports(tmp_path, adapter):
    overrides = [*TINY, f"adapter={adapter}", "trainer.max_steps=2"]
    if adapter == "none":
        overrides.append("optimizer.lr=1e-4")
    metrics = train(compose_config(overrides, tmp_path))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    exported = {p.name for p in (tmp_path / "adapter").iterdir()}
    weights = "model.safetensors" if adapter == "none" else "adapter_model.safetensors"
    assert weights in exported


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    base = [*TINY, "adapter.dropout=0", "trainer.max_steps=3"]
    train(compose_config(base, tmp_path / "plain"))
    train(compose_config([*base, "model.gradient_checkpointing=true"], tmp_path / "ckpt"))
    torch.testing.assert_close(
        logged(tmp_path / "ckpt", "train/loss"), logged(tmp_path / "plain", "train/loss")
    )


@pytest.mark.slow
def test_training_continues_from_a_saved_adapter(tmp_path):
    train(compose_config([*TINY, "adapter.dropout=0"], tmp_path / "first"))
    second = [
        *TINY,
        "adapter.dropout=0",
        f"adapter.lora_model_dir={tmp_path / 'first/adapter'}",
        "trainer.max_steps=1",
    ]
    train(compose_config(second, tmp_path / "second"))
    # The continued run starts where the first left off, not from the untrained model.
    first_losses = logged(tmp_path / "first", "train/loss")
    assert logged(tmp_path / "second", "train/loss")[0] < first_losses[0] - 0.1


def test_qlora_without_bitsandbytes_stops_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    run = build_run(compose_config([*TINY, "adapter=qlora"], tmp_path))
    with pytest.raises(QuantizationUnavailableError, match="adapter=qlora"):
        run.trainer.fit(run.module, datamodule=run.datamodule)
    assert not (tmp_path / "checkpoints").exists()


def _step_with_recompute_counts(checkpointing: bool, every: int = 1):
    """Loss, adapter gradients and how often each layer's MLP ran in one forward + backward of
    a 4-layer tiny model."""
    module = packed_test_module(
        checkpointing=checkpointing,
        overrides=("model.source.num_hidden_layers=4", f"model.checkpoint_every={every}"),
    )
    runs = [0] * 4
    for index, layer in enumerate(module.model.get_base_model().model.layers):
        # The MLP is inside the checkpointed forward, so a recomputed layer enters it twice (a
        # pre-hook: torch stops a recomputation once it has what backward needs, before the
        # MLP returns).
        layer.mlp.register_forward_pre_hook(lambda *_, i=index: runs.__setitem__(i, runs[i] + 1))
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    loss = module(ids).float().logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    return loss.detach(), grads, runs


def test_checkpointing_every_second_layer_recomputes_only_those_with_the_same_gradients():
    loss, grads, runs = _step_with_recompute_counts(checkpointing=False)
    assert runs == [1, 1, 1, 1]
    for every, expected in ((1, [2, 2, 2, 2]), (2, [2, 1, 2, 1]), (3, [2, 1, 1, 2])):
        checked_loss, checked_grads, runs = _step_with_recompute_counts(True, every)
        assert runs == expected, every
        # Recomputation repeats the same operations on the same inputs: identical results.
        torch.testing.assert_close(checked_loss, loss, rtol=0, atol=0)
        torch.testing.assert_close(checked_grads, grads, rtol=0, atol=0)
    # Without checkpointing the setting changes nothing.
    assert _step_with_recompute_counts(False, every=2)[2] == [1, 1, 1, 1]


@pytest.mark.parametrize("adapter", ["qlora", "lora"])
def test_reentrant_checkpointing_records_no_graph_in_forward_and_gives_the_same_numbers(adapter):
    """`model.reentrant_checkpointing` (the default): a checkpointed layer's forward runs
    without autograd, which backward's recomputation then records; the non-reentrant form
    records it in both; a layer whose input needs no gradient stays non-reentrant. The same
    loss and gradients to the bit, with dropout under bf16 autocast as the canonical job, over
    a 4-bit base and a full-precision one."""
    ids = torch.randint(3, 1000, (1, 48), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(20), torch.arange(28)])[None]
    batch = {"input_ids": ids, "position_ids": positions, "labels": ids}
    results = {}
    for reentrant in (True, False):
        module = packed_test_module(
            checkpointing=True,
            overrides=(
                f"adapter={adapter}",
                "adapter.dropout=0.3",
                f"model.reentrant_checkpointing={str(reentrant).lower()}",
            ),
        ).train()
        base = module.model.get_base_model().model
        layers = base.layers
        modes, embedded = [], []
        for layer in layers:
            layer.mlp.register_forward_pre_hook(
                lambda *_, seen=modes: seen.append(torch.is_grad_enabled())
            )
        base.embed_tokens.register_forward_hook(
            lambda *args, seen=embedded: seen.append(args[-1].requires_grad)
        )
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = module._loss_sum(batch)
        # transformers and peft make the embeddings' output require grad for checkpointing;
        # lorafit's reentrant form needs no gradient made for it, and the first layer, whose
        # input that is, stays non-reentrant.
        assert embedded == [not reentrant]
        assert modes == [True] + [not reentrant] * (len(layers) - 1)
        loss.backward()
        assert modes[len(layers) :] == [True] * len(layers)  # recomputed with autograd
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
        results[reentrant] = [loss.detach(), *grads]
    assert_bitwise_equal(results[True], results[False])


def _qlora_module(upcast: bool) -> CausalLMModule:
    cfg = compose_config(
        [
            *TINY,
            "adapter=qlora",
            "model.dtype=bfloat16",
            "model.gradient_checkpointing=true",
            f"adapter.upcast_unquantized={str(upcast).lower()}",
        ]
    )
    torch.manual_seed(0)
    module = CausalLMModule(model=cfg.model, adapter=cfg.adapter, optimizer={}, scheduler={})
    module.configure_model()
    return module


def _unquantized(module: CausalLMModule) -> dict[str, torch.Tensor]:
    return {
        name: p.detach()
        for name, p in module.named_parameters()
        if not p.requires_grad and type(p).__name__ != "Params4bit"
    }


def test_qlora_can_keep_the_unquantized_weights_and_the_residual_stream_in_bf16():
    upcast, kept = _qlora_module(upcast=True), _qlora_module(upcast=False)
    fp32, bf16 = _unquantized(upcast), _unquantized(kept)
    # Norms: peft's fp32 copies, or the loaded bf16 values exactly (every fp32 value came from
    # bf16). The embedding and output layer keep their bf16 either way (loaded_embeddings.py).
    assert {n.split(".")[-2] for n in bf16} >= {"embed_tokens", "input_layernorm", "lm_head"}
    embeddings = {n for n in fp32 if n.split(".")[-2] in ("embed_tokens", "lm_head")}
    assert len(embeddings) == 2
    assert {t.dtype for n, t in fp32.items() if n not in embeddings} == {torch.float32}
    assert {fp32[n].dtype for n in embeddings} == {torch.bfloat16}
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16}
    for name, weight in bf16.items():
        assert torch.equal(weight, fp32[name].to(torch.bfloat16)), name
    streams = {}
    for key, module in (("upcast", upcast), ("kept", kept)):
        seen = streams.setdefault(key, set())
        for layer in module.model.get_base_model().model.layers:
            layer.register_forward_pre_hook(lambda _, args, seen=seen: seen.add(args[0].dtype))
        ids = torch.randint(3, 1000, (1, 32), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            module(ids)
    # What gradient checkpointing keeps per layer is its input: half the bytes in bf16.
    assert streams == {"upcast": {torch.float32}, "kept": {torch.bfloat16}}


def test_qlora_trains_alike_with_the_unquantized_weights_in_bf16(tmp_path):
    base = [*TINY, "adapter=qlora", "model.dtype=bfloat16", "trainer=cpu_bf16"]
    base += ["adapter.dropout=0", "trainer.max_steps=3"]
    train(compose_config(base, tmp_path / "upcast"))
    train(compose_config([*base, "adapter.upcast_unquantized=false"], tmp_path / "kept"))
    upcast = torch.tensor(logged(tmp_path / "upcast", "train/loss"))
    kept = torch.tensor(logged(tmp_path / "kept", "train/loss"))
    # The same model and updates; only the residual stream's rounding differs (bf16 noise).
    torch.testing.assert_close(kept, upcast, rtol=1e-3, atol=0)
