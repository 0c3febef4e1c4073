"""`model.liger_kernels`: Liger's Triton kernels for the decoder's RMSNorm, SwiGLU and rotary
embedding, on CUDA.

transformers computes each of these as a chain of elementwise operations, each a pass over
the activations in GPU memory (RMSNorm in fp32: a cast, a square, a mean, a reciprocal square
root, two products); Liger fuses each into one kernel with a hand-written backward, and keeps
less for backward. The loss is not Liger's: lorafit's own fused loss (`model.loss_chunk_size`)
already keeps the logits from being materialised.

Applied to the loaded base model before the adapter is attached: the norms' and MLPs'
`forward` are replaced on the instances, so peft's LoRA layers inside them are called as before.
The rotary embedding is replaced in the model family's module, for the whole process, as Liger
does it; a training process loads one model family. Training only (`CausalLMModule`): eval,
generate and export run the plain model.
"""

from __future__ import annotations

import importlib.util
import inspect

import torch

from lorafit.errors import ConfigError

KEY = "model.liger_kernels"


def check_liger(device_type: str) -> None:
    """Refuse the switch where Liger cannot run, before any weight loads: its kernels are
    Triton, for CUDA GPUs, and the package is an optional one."""
    if device_type != "cuda":
        raise ConfigError(
            f"{KEY}=true: Liger's kernels are Triton kernels for CUDA GPUs, and this run trains "
            f"on {device_type}. Set {KEY}=false."
        )
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError(
            f"{KEY}=true needs the liger-kernel package: pip install liger-kernel "
            f"(or set {KEY}=false)."
        )


def apply_liger_kernels(model: torch.nn.Module) -> list[str]:
    """Replace the RMSNorm, SwiGLU and rotary embedding of a loaded transformers model with
    Liger's; returns the names of the kernels applied. A model family Liger has no kernels for
    is refused, naming it, rather than trained silently without them."""
    from liger_kernel.transformers import monkey_patch

    model_type = getattr(model.config, "model_type", None)
    apply = monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        raise ConfigError(
            f"{KEY}=true: this Liger has no kernels for model type {model_type!r} (llama and "
            f"mistral are among those it has); set {KEY}=false."
        )
    wanted = {"rope": True, "rms_norm": True, "swiglu": True}
    # The loss stays lorafit's: no cross entropy of Liger's, no replaced model forward.
    off = {"cross_entropy": False, "fused_linear_cross_entropy": False}
    takes = inspect.signature(apply).parameters
    kernels = {name: on for name, on in wanted.items() if name in takes}
    apply(model=model, **kernels, **{name: v for name, v in off.items() if name in takes})
    return sorted(kernels)
