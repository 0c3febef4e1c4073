"""Guards around bitsandbytes quantization: fail early when it cannot run, train correctly when
it can.

bitsandbytes is imported inside each function, so importing this module works without it.
"""

from __future__ import annotations

from types import ModuleType

import torch

from lorafit.errors import QuantizationUnavailableError

# Large enough to fill several quantization blocks, small enough to run in milliseconds.
_PROBE_SHAPE = (64, 64)
# NF4 reconstructs a standard normal tensor with about 0.1 relative error and int8 a linear layer
# with well under 0.01; a result beyond these means the kernels ran but computed garbage.
_MAX_4BIT_ERROR = 0.25
_MAX_8BIT_ERROR = 0.05


def disable_cpu_weight_repacking(model: torch.nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer of `model` on the weight layout that backward supports.

    On a CPU with AVX512-BF16, `bnb.nn.Linear4bit.forward` repacks its weight into a CPU-only
    layout the first time it runs in eval mode on an input that does not require grad, as a
    validation pass does. From then on the layer computes through a kernel with no autograd
    support, so no gradient flows back through the frozen base weight and the LoRA gradients of
    every earlier layer come out wrong, without any error. Call this after loading the model and
    before its first forward.

    Args:
        model: A model that may contain `bnb.nn.Linear4bit` layers.

    Returns:
        The number of `bnb.nn.Linear4bit` layers changed; 0 when bitsandbytes is not installed,
        since a model cannot hold its layers then.

    Raises:
        RuntimeError: If a layer was already repacked; converting back is lossy in bitsandbytes,
            so the model has to be loaded again.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0

    touched = 0
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        quant_state = getattr(module.weight, "quant_state", None)
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise RuntimeError(
                f"The 4-bit layer {name!r} was already repacked for CPU inference by an earlier "
                "eval-mode forward, so its gradients would be wrong. Load the model again and "
                "call disable_cpu_weight_repacking before running it."
            )
        module.support_avx512bf16_for_cpu = False
        touched += 1
    return touched


def check_bitsandbytes(device: torch.device | str, bits: int) -> None:
    """Check that bitsandbytes can quantize on `device` before any model is loaded for it.

    Runs a tiny round trip with the kernels that `bits`-bit training uses, so that a missing or
    broken bitsandbytes fails in about a millisecond with advice, rather than deep inside model
    loading or the first training step.

    Args:
        device: The device the model will be trained on.
        bits: The quantization width the adapter asks for, 4 (QLoRA, NF4) or 8 (LLM.int8()).

    Raises:
        ValueError: If `bits` is neither 4 nor 8.
        QuantizationUnavailableError: If bitsandbytes cannot be imported or the round trip fails
            or gives a wrong result on `device`.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8 for bitsandbytes quantization, got {bits!r}")
    device = torch.device(device)

    def unavailable(problem: str) -> QuantizationUnavailableError:
        return QuantizationUnavailableError(
            f"adapter.quantization asks for {bits}-bit (load_in_{bits}bit: adapter="
            f"{'qlora' if bits == 4 else 'lora_8bit'}), which needs "
            f"bitsandbytes on {device}, but {problem}. Install a bitsandbytes build that "
            f"supports {device.type}, train on a device it supports, or choose adapter=lora "
            "to train without quantization."
        )

    try:
        import bitsandbytes as bnb
    except Exception as exc:  # a broken install can fail with OSError or RuntimeError, too
        raise unavailable(f"importing it failed ({type(exc).__name__}: {exc})") from exc

    try:
        # Lightning runs configure_model with the accelerator as the default device; the probe
        # chooses every device itself, so any such context (cuda, meta) must not leak in.
        with torch.device("cpu"):
            error = _round_trip_4bit(bnb, device) if bits == 4 else _round_trip_8bit(bnb, device)
    except Exception as exc:  # backends report unsupported devices with many exception types
        raise unavailable(
            f"a {bits}-bit test on a tiny tensor failed ({type(exc).__name__}: {exc})"
        ) from exc

    limit = _MAX_4BIT_ERROR if bits == 4 else _MAX_8BIT_ERROR
    if not error <= limit:  # also catches NaN
        raise unavailable(
            f"a {bits}-bit test on a tiny tensor came back wrong (relative error {error:.3g}, "
            f"expected at most {limit})"
        )


def _probe_tensor(*shape: int) -> torch.Tensor:
    # A private generator, so that checking never shifts the seeded global random stream.
    generator = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(*shape, generator=generator, device="cpu")


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float().cpu() - expected).norm() / expected.norm())


def _round_trip_4bit(bnb: ModuleType, device: torch.device) -> float:
    """Quantize to NF4 with double quantization, as QLoRA loads weights, and dequantize."""
    original = _probe_tensor(*_PROBE_SHAPE)
    packed, quant_state = bnb.functional.quantize_4bit(
        original.to(device), quant_type="nf4", compress_statistics=True
    )
    restored = bnb.functional.dequantize_4bit(packed, quant_state)
    return _relative_error(restored, original)


def _round_trip_8bit(bnb: ModuleType, device: torch.device) -> float:
    """Quantize a tiny int8 linear layer on `device` and compare one forward with fp32."""
    out_features, in_features = _PROBE_SHAPE
    weight = _probe_tensor(out_features, in_features)
    inputs = _probe_tensor(4, in_features)
    # Building the layer draws its initial weights from the global generator; keep that unseen.
    with torch.random.fork_rng(devices=[]):
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False)
    layer.load_state_dict({"weight": weight})
    layer = layer.to(device)  # int8 quantization happens on this move
    with torch.no_grad():
        output = layer(inputs.to(device))
    return _relative_error(output, inputs @ weight.T)
