"""Under peft's recipe a quantized base's embedding and output layer keep their loaded bf16 and
compute, bit for bit, what peft's fp32 copies compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import MistralConfig, MistralForCausalLM

from helpers import TINY, compose_config
from lorafit.model.loaded_embeddings import LoadedDtypeLinear, keep_embeddings_as_loaded
from lorafit.model.module import CausalLMModule


def _qlora_module(overrides: list[str], device: str = "cpu") -> CausalLMModule:
    cfg = compose_config(
        [*TINY, "adapter=qlora", "model.dtype=bfloat16", "model.gradient_checkpointing=true"]
        + overrides
    )
    torch.manual_seed(0)
    module = CausalLMModule(
        model=cfg.model, adapter=cfg.adapter, optimizer={}, scheduler={}, load_device=device
    )
    module.configure_model()
    module.to(device)
    for name, p in module.named_parameters():
        if "lora_B" in name:  # a non-zero adapter, so its gradients carry the whole path
            generator = torch.Generator(p.device).manual_seed(2)
            torch.nn.init.normal_(p, std=0.05, generator=generator)
    module.train()
    return module


def _as_peft_made_them(module: CausalLMModule) -> None:
    """The fp32 copies peft's recipe leaves (the layers' own code, which then widens nothing)."""
    causal_lm = module.model.get_base_model()
    for layer in (causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()):
        layer.weight.data = layer.weight.data.float()


def _batch(device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 1000, (1, 48), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :10] = -100
    positions = torch.cat([torch.arange(20), torch.arange(28)]).unsqueeze(0)  # two examples
    batch = {"input_ids": ids, "position_ids": positions, "labels": labels}
    return {key: value.to(device) for key, value in batch.items()}


def _loss_and_grads(module: CausalLMModule, autocast: bool):
    device = next(module.parameters()).device
    torch.manual_seed(3)  # the same dropout masks for both
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        total, count = module._loss_sum(_batch(device))
    total.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    return total.detach(), grads


def _compare(autocast: bool, chunk: int | None, device: str = "cpu") -> None:
    overrides = [f"model.loss_chunk_size={chunk if chunk else 'null'}"]
    if device == "cuda":  # flash attention's backward may add in any order: not bit for bit
        overrides.append("model.attn_implementation=eager")
    kept, reference = _qlora_module(overrides, device), _qlora_module(overrides, device)
    causal_lm = kept.model.get_base_model()
    embedding, head = causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()
    # Half the bytes: the loaded bf16 values themselves, not an fp32 copy of them.
    assert embedding.weight.dtype == head.weight.dtype == torch.bfloat16
    assert isinstance(head, LoadedDtypeLinear)
    # The fused loss can still stand in for the kept output layer.
    assert kept._output_layer() is not None
    norms = [p for n, p in causal_lm.named_parameters() if "norm" in n]
    assert norms and {p.dtype for p in norms} == {torch.float32}  # the norms stay peft's fp32
    _as_peft_made_them(reference)
    streams = []
    causal_lm.model.layers[0].register_forward_pre_hook(lambda _, a: streams.append(a[0].dtype))
    loss, grads = _loss_and_grads(kept, autocast)
    expected_loss, expected_grads = _loss_and_grads(reference, autocast)
    assert streams and set(streams) == {torch.float32}  # the residual stream is fp32 as before
    assert torch.equal(loss, expected_loss)
    assert grads.keys() == expected_grads.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        assert torch.equal(grad, expected_grads[name]), name


@pytest.mark.parametrize("autocast", [True, False], ids=["bf16-autocast", "fp32"])
@pytest.mark.parametrize("chunk", [16, None], ids=["fused-loss", "plain-loss"])
def test_the_kept_embedding_and_output_layer_compute_as_fp32_copies(autocast, chunk):
    _compare(autocast, chunk)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("chunk", [16, None], ids=["fused-loss", "plain-loss"])
def test_on_a_gpu_the_kept_embedding_and_output_layer_compute_as_fp32_copies(chunk):
    # cuBLAS and bitsandbytes' CUDA kernels under bf16 autocast (the attention eager there).
    _compare(True, chunk, "cuda")


def test_without_quantization_or_with_the_bf16_stream_nothing_changes():
    bf16 = _qlora_module(["adapter.upcast_unquantized=false"]).model.get_base_model()
    assert type(bf16.get_output_embeddings()) is nn.Linear
    assert bf16.get_input_embeddings().weight.dtype == torch.bfloat16
    plain = _qlora_module(["adapter=lora"]).model.get_base_model()
    assert type(plain.get_output_embeddings()) is nn.Linear
    for model in (bf16, plain):
        hooks = model.get_input_embeddings()._forward_hooks.values()
        assert all(hook.__name__ != "_widen" for hook in hooks)


def _tiny(tied: bool) -> MistralForCausalLM:
    config = MistralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return MistralForCausalLM(config).to(torch.bfloat16)


def _upcast(model: nn.Module) -> dict[str, torch.dtype]:
    loaded = {name: p.dtype for name, p in model.named_parameters()}
    for p in model.parameters():
        p.data = p.data.float()  # what peft's recipe does to every unquantized weight
    return loaded


def test_tied_weights_are_kept_once_for_both_layers():
    model = _tiny(tied=True)
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    loaded = _upcast(model)
    expected = model(ids).logits
    assert keep_embeddings_as_loaded(model, loaded) == ["embedding", "output layer"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(model(ids).logits, expected)


class _ScaledEmbedding(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 2.0


def test_an_embedding_with_its_own_forward_keeps_its_fp32_copy_and_so_does_its_tied_head():
    model = _tiny(tied=True)
    model.model.embed_tokens.__class__ = _ScaledEmbedding
    loaded = _upcast(model)
    assert keep_embeddings_as_loaded(model, loaded) == []
    assert model.lm_head.weight.dtype == torch.float32
    untied = _tiny(tied=False)
    untied.model.embed_tokens.__class__ = _ScaledEmbedding
    assert keep_embeddings_as_loaded(untied, _upcast(untied)) == ["output layer"]
    assert untied.model.embed_tokens.weight.dtype == torch.float32


def test_weights_loaded_in_fp32_stay_as_they_are():
    model = _tiny(tied=False).float()
    assert keep_embeddings_as_loaded(model, _upcast(model)) == []
    assert type(model.lm_head) is nn.Linear
