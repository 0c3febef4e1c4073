"""Tests for the bitsandbytes guards: right QLoRA gradients on CPU, early and readable failures."""

from __future__ import annotations

import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    MistralConfig,
    MistralForCausalLM,
)

from lorafit.errors import QuantizationUnavailableError
from lorafit.model.quantization import check_bitsandbytes, disable_cpu_weight_repacking

# 2 layers x (q, k, v, o, gate, up, down): every linear projection except lm_head.
N_PROJECTIONS = 14
VOCAB_SIZE = 1000
# Both sides compute with the same dequantized weights, so quantization error cancels out; on CPU
# they agree exactly, and the margin leaves room for a backend whose 4-bit matmul rounds otherwise.
MAX_GRAD_ERROR = 0.05
# Without the guard most LoRA gradients are off by 0.4 to 0.9 here.
MIN_TRAP_ERROR = 0.3

Gradients = dict[str, torch.Tensor]


def _cpu_has_avx512_bf16() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(
        line.startswith("flags") and "avx512_bf16" in line.split() for line in cpuinfo.splitlines()
    )


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved random two-layer Mistral, small enough to quantize and train in a second."""
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    folder = tmp_path_factory.mktemp("tiny-mistral")
    MistralForCausalLM(config).save_pretrained(folder)
    return folder


def _batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB_SIZE, (2, 16), generator=generator)


def _with_lora(model: torch.nn.Module) -> torch.nn.Module:
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    torch.manual_seed(2)
    return get_peft_model(model, config)


def _lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def _loss_and_gradients(model: torch.nn.Module, batch: torch.Tensor) -> tuple[float, Gradients]:
    model.train()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in _lora_parameters(model).items()}


def _qlora_run(folder: Path, *, guard: bool) -> tuple[int, float, Gradients, float, Gradients]:
    """Train one step of QLoRA after a validation pass, and the same step in full precision.

    Returns:
        The number of layers the guard touched, then loss and LoRA gradients of the 4-bit model,
        then those of a full-precision model holding its dequantized weights and the same LoRA.
    """
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantization, dtype=torch.float32
    )
    touched = disable_cpu_weight_repacking(model) if guard else 0
    # Dequantize now: the repacking this guards against rewrites the weights in place.
    dequantized = {
        name: bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }
    model = _with_lora(model)
    # peft starts every lora_B at zero, which zeroes the gradient of every lora_A.
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in _lora_parameters(model).items():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))

    batch = _batch()
    model.eval()
    with torch.no_grad():  # as a validation pass runs between training steps
        model(input_ids=batch)
    loss, gradients = _loss_and_gradients(model, batch)

    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if name in dequantized:
                module.weight.copy_(dequantized.pop(name))
        assert not dequantized, f"no full-precision layer for {sorted(dequantized)}"
        reference = _with_lora(reference)
        reference_lora = _lora_parameters(reference)
        for name, param in _lora_parameters(model).items():
            reference_lora[name].copy_(param)
    reference_loss, reference_gradients = _loss_and_gradients(reference, batch)
    return touched, loss, gradients, reference_loss, reference_gradients


def _relative_errors(gradients: Gradients, reference: Gradients) -> dict[str, float]:
    assert gradients.keys() == reference.keys()
    return {
        name: float((gradients[name] - reference[name]).norm() / reference[name].norm())
        for name in reference
    }


def test_guarded_qlora_gradients_match_full_precision(tiny_mistral: Path) -> None:
    touched, loss, gradients, reference_loss, reference_gradients = _qlora_run(
        tiny_mistral, guard=True
    )

    assert touched == N_PROJECTIONS
    assert len(gradients) == 2 * N_PROJECTIONS
    errors = _relative_errors(gradients, reference_gradients)
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] < MAX_GRAD_ERROR, f"relative gradient error {errors[worst]:.3g} at {worst}"
    assert loss == pytest.approx(reference_loss, rel=1e-4), f"{loss} vs {reference_loss}"


@pytest.mark.skipif(
    not _cpu_has_avx512_bf16(), reason="bitsandbytes repacks 4-bit weights only with AVX512-BF16"
)
# torch's own notice that backward went through the repacked kernel, expected here.
@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered:UserWarning")
def test_unguarded_qlora_gradients_go_wrong_after_eval_pass(tiny_mistral: Path) -> None:
    # Documents the hazard the guard exists for; if this starts failing, bitsandbytes has
    # changed and the guard may be unnecessary.
    _, _, gradients, _, reference_gradients = _qlora_run(tiny_mistral, guard=False)

    errors = _relative_errors(gradients, reference_gradients)
    worst = max(errors.values())
    assert worst > MIN_TRAP_ERROR, f"largest relative gradient error only {worst:.3g}"


def test_check_bitsandbytes_passes_for_4bit_on_cpu() -> None:
    check_bitsandbytes("cpu", 4)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("default_device", ["meta", "cpu"])
def test_check_bitsandbytes_ignores_the_default_device(bits: int, default_device: str) -> None:
    # Lightning calls configure_model with the accelerator as torch's default device; on a GPU
    # that is cuda, and a probe drawn with a CPU generator there stopped every QLoRA run. A
    # meta default device reproduces the mismatch on CPU.
    before = torch.get_rng_state()
    with torch.device(default_device):
        check_bitsandbytes("cpu", bits)
    assert torch.equal(torch.get_rng_state(), before)  # the seeded stream is untouched


def test_check_bitsandbytes_rejects_other_widths() -> None:
    with pytest.raises(ValueError, match="got 3"):
        check_bitsandbytes(torch.device("cpu"), 3)


def test_check_bitsandbytes_explains_a_missing_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)

    with pytest.raises(QuantizationUnavailableError) as caught:
        check_bitsandbytes("cpu", 4)

    message = str(caught.value)
    for part in ("4-bit", "importing it failed", "adapter=lora"):
        assert part in message, f"{part!r} missing from: {message}"
