"""Offline model presets: the random Mistral-7B has the real architecture, and random models
are built in their own dtype, reproducibly, without touching the run's random stream."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from safetensors import safe_open
from transformers import MistralForCausalLM

from helpers import compose_config
from lorafit.model.adapters import trainable_parameters
from lorafit.model.shape_checks import check_model_fits

# mistralai/Mistral-7B-v0.1's config.json, the fields that fix shape and numerics.
MISTRAL_7B_V01 = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# A Mistral-7B preset shrunk to seconds on CPU, everything else as configured.
SMALL = [
    "model=mistral_7b_random",
    "model.source.hidden_size=64",
    "model.source.intermediate_size=128",
    "model.source.num_hidden_layers=1",
    "model.source.num_attention_heads=4",
    "model.source.num_key_value_heads=2",
]


def test_random_mistral_7b_has_the_real_architecture_and_tokenizer():
    source = instantiate(compose_config(["model=mistral_7b_random"]).model.source)
    config = source.config.to_dict()
    assert {key: config[key] for key in MISTRAL_7B_V01} == MISTRAL_7B_V01
    assert config["rope_parameters"]["rope_theta"] == 10000.0
    with torch.device("meta"):
        model = MistralForCausalLM(source.config)
    assert sum(p.numel() for p in model.parameters()) == 7_241_732_096
    adapter = instantiate(compose_config(["adapter=qlora", "adapter.r=32"]).adapter)
    peft_model = adapter.apply(model, gradient_checkpointing=False)
    assert trainable_parameters(peft_model)["trainable"] == 83_886_080
    tokenizer = source.load_tokenizer()
    assert len(tokenizer) == 32000
    assert tokenizer("Below is an instruction")["input_ids"] == [1, 20811, 349, 396, 13126]


def test_random_mistral_is_built_in_bf16_once_and_the_same_for_the_same_seed():
    source = instantiate(compose_config(SMALL).model.source)
    before = torch.get_rng_state()
    model = source.load_model(
        dtype=torch.bfloat16, quantization_config=None, attn_implementation="sdpa", device_map=None
    )
    assert torch.equal(torch.get_rng_state(), before)  # building left the run's stream alone
    (weights,) = source.folder().glob("*.safetensors")
    with safe_open(weights, "pt") as saved:
        assert {saved.get_slice(name).get_dtype() for name in saved.keys()} == {"BF16"}
    config = json.loads((source.folder() / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["rms_norm_eps"] == 1e-5

    again = instantiate(compose_config(SMALL).model.source)
    assert again.folder() == source.folder()
    other = instantiate(compose_config([*SMALL, "model.source.seed=1"]).model.source)
    assert other.folder() != source.folder()
    first = model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    rebuilt = MistralForCausalLM.from_pretrained(source.folder())
    assert torch.equal(rebuilt.state_dict()["model.layers.0.mlp.up_proj.weight"], first)
    assert first.dtype == torch.bfloat16 and 0.015 < float(first.float().std()) < 0.025


@pytest.mark.slow
def test_converting_the_gguf_leaves_the_random_stream_alone(tmp_path, monkeypatch):
    # A cold cache converts the GGUF (building a randomly initialised model first); a warm one
    # does not. The run's seeded stream must be the same either way, or the first run on a
    # machine would train differently from every later one.
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path))
    source = instantiate(compose_config(["model=smollm2_135m"]).model.source)
    before = torch.get_rng_state()
    source.prepare()
    assert torch.equal(torch.get_rng_state(), before)


def test_checking_the_model_shape_leaves_the_random_stream_alone():
    cfg = compose_config(["model=tiny_mistral", "adapter.target_linear=false"])
    before = torch.get_rng_state()
    check_model_fits(cfg)
    assert torch.equal(torch.get_rng_state(), before)
