"""The packing preflight: isolation passes in every precision training computes in, and a leak
fails in every one of them, bf16 autocast included."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY, compose_config, packed_demo, packed_test_module
from lorafit.errors import PackingError
from lorafit.model.isolation import check_isolation, compute_precision
from lorafit.model.module import CausalLMModule
from lorafit.training import build_run


def _bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


class _IgnoresPositions(CausalLMModule):
    """Drops the position ids: positions run on and every example sees those before it."""

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return super().forward(input_ids, attention_mask=attention_mask)


class _MasksAcrossExamples(CausalLMModule):
    """Keeps the restarting positions but passes an all-ones attention mask, as a collate that
    adds one would: transformers then builds a plain causal mask across the whole row."""

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        ones = torch.ones_like(input_ids)
        return super().forward(input_ids, attention_mask=ones, position_ids=position_ids)


def _as(cls: type[CausalLMModule], module: CausalLMModule) -> CausalLMModule:
    leaky = cls.__new__(cls)
    leaky.__dict__ = module.__dict__
    return leaky


def test_isolated_rows_pass_with_unchanged_logits(demo_examples):
    packed, collate = packed_demo(demo_examples)
    report = check_isolation(packed_test_module(), packed, collate)
    assert report.precision.name == "float32" and report.examples >= 4
    assert report.worst_loss_error < 1e-4
    assert report.worst_logit_change == 0.0  # isolated kernels never see the other example


@pytest.mark.parametrize("leak", [_IgnoresPositions, _MasksAcrossExamples])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_a_leak_fails_in_fp32_and_under_bf16_autocast(demo_examples, leak, autocast):
    packed, collate = packed_demo(demo_examples)
    leaky = _as(leak, packed_test_module())
    with _bf16_autocast() if autocast else torch.autocast("cpu", enabled=False):
        with pytest.raises(PackingError, match="not isolated"):
            check_isolation(leaky, packed, collate)


def test_the_perturbation_alone_catches_a_leak_below_bf16_loss_tolerance(demo_examples):
    # A random tiny model barely depends on context: its leaked losses move by ~1e-3, below
    # what bf16 allows for packed against alone (3e-2). The perturbation still sees the leak.
    packed, collate = packed_demo(demo_examples)
    honest = packed_test_module()
    with _bf16_autocast():
        report = check_isolation(honest, packed, collate)
        assert report.precision.loss_tolerance > 1e-2
        with pytest.raises(PackingError, match="changed the logits"):
            check_isolation(_as(_IgnoresPositions, honest), packed, collate)


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "sdpa_packed"])
def test_bf16_rounding_is_not_read_as_a_leak(demo_examples, attn):
    # A pretrained model's logits are large, so bf16 rounds its packed and alone losses apart
    # by up to ~1e-2 (relative) through sdpa's block mask: far above fp32's 1e-4, and no leak.
    # The check computes in autocast, as training does, and allows for it. sdpa_packed attends
    # each example by the same kernel call as alone, so nothing may be rounded apart there.
    overrides = [*TINY, "model=smollm2_135m", "adapter.dropout=0"]
    cfg = compose_config([*overrides, f"model.attn_implementation={attn}"])
    module = CausalLMModule(model=cfg.model, adapter=cfg.adapter, optimizer={}, scheduler={})
    module.configure_model()
    packed, collate = packed_demo(demo_examples)
    with _bf16_autocast():
        report = check_isolation(module, packed, collate)
    assert report.precision.name == "bfloat16"
    assert report.worst_loss_error < report.precision.loss_tolerance
    if attn == "sdpa":
        assert report.worst_loss_error > 1e-4  # the rounding this test is about took place
    assert report.worst_logit_change == 0.0


def test_precision_follows_autocast_weights_and_quantized_compute():
    cpu = torch.device("cpu")
    fp32 = packed_test_module()
    assert compute_precision(fp32, cpu).name == "float32"
    with _bf16_autocast():
        assert compute_precision(fp32, cpu).name == "bfloat16"
    with torch.autocast("cpu", dtype=torch.float16):
        assert compute_precision(fp32, cpu).name == "float16"
    assert compute_precision(fp32.to(torch.bfloat16), cpu).name == "bfloat16"
    # QLoRA with every unquantized weight fp32 (peft's recipe as peft leaves it), yet the 4-bit
    # matmuls run in bf16 (the case a first parameter's dtype got wrong on the GPU).
    qlora = packed_test_module(overrides=("adapter=qlora", "model.dtype=bfloat16"))
    for param in qlora.parameters():
        if param.is_floating_point():
            param.data = param.data.float()
    assert {p.dtype for p in qlora.parameters() if p.is_floating_point()} == {torch.float32}
    assert compute_precision(qlora, cpu).name == "bfloat16"
    lora_8bit = packed_test_module(overrides=("adapter=lora_8bit",))
    assert compute_precision(lora_8bit, cpu).name == "float16"


def test_training_runs_the_preflight_in_the_trainers_precision(tmp_path):
    cfg = compose_config(
        [
            *TINY,
            "trainer.precision=bf16-mixed",
            "trainer.max_steps=1",
            "data.sample_packing=true",
            "data.sequence_len=512",
        ],
        tmp_path,
    )
    run = build_run(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    report = run.module.isolation
    assert report is not None and report.precision.name == "bfloat16"
    assert report.examples > 0 and report.worst_logit_change == 0.0


@pytest.mark.gpu
def test_flash_attention_varlen_isolates_packed_examples(demo_examples):
    pytest.importorskip("flash_attn")
    module = packed_test_module("flash_attention_2", overrides=("model.dtype=bfloat16",)).cuda()
    packed, collate = packed_demo(demo_examples)
    report = check_isolation(module, packed, collate)
    assert report.precision.name == "bfloat16"
    assert report.worst_logit_change <= report.precision.eps
