"""What gets trained on top of the base model: a LoRA adapter (over a full-precision, 8-bit or
4-bit base) or, with `adapter=none`, every weight of the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch.utils.checkpoint import checkpoint
from transformers import BitsAndBytesConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from lorafit.errors import ConfigError
from lorafit.model.autocast_outputs import return_autocast_dtype
from lorafit.model.loaded_embeddings import keep_embeddings_as_loaded
from lorafit.model.lora_branch import add_updates_in_fp32, fuse_lora_branches
from lorafit.model.lora_dropout import fuse_lora_dropout
from lorafit.model.rms_norm import fuse_rms_norm
from lorafit.model.swiglu import fuse_swiglu

# Peft's shorthand for "every nn.Linear but the output head": Axolotl's lora_target_linear.
ALL_LINEAR = "all-linear"


def quantization_bits(quantization: BitsAndBytesConfig | None) -> int | None:
    """4 or 8 for a bitsandbytes config, None for a full-precision base."""
    if quantization is None:
        return None
    if quantization.load_in_4bit:
        return 4
    if quantization.load_in_8bit:
        return 8
    return None


def _enable_gradient_checkpointing(
    model: PreTrainedModel, quantized: bool, every: int, reentrant: bool = True
) -> None:
    kwargs = {"use_reentrant": False}  # the layers' own function is set below
    if quantized:
        # Also casts the remaining full-precision weights (norms, embeddings) to fp32.
        prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs
        )
    elif hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    if reentrant:
        for layer in model.modules():
            if isinstance(layer, GradientCheckpointingLayer):
                layer._gradient_checkpointing_func = checkpoint_layer
    checkpoint_every_nth_layer(model, every)


def checkpoint_layer(function, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
    """`model.reentrant_checkpointing`: a layer whose input requires grad goes through torch's
    reentrant checkpoint, which runs its forward without autograd and records the graph only
    when backward recomputes it; the non-reentrant one records it in forward too and calls a
    Python hook for each tensor the layer would keep. The same numbers bit for bit, in less
    host work a step (docs/benchmarks.md), which at 2048 tokens a GPU waits on.

    A layer whose input needs no gradient takes the non-reentrant form, the only one that
    reaches the trained weights inside without one: the first layer, whose input is the frozen
    embeddings' output, so no gradient is made for that input (`_no_embedding_output_grad`).
    Only backward() reaches inside the reentrant form, torch.autograd.grad does not: `false`
    for that."""
    reentrant = any(isinstance(arg, torch.Tensor) and arg.requires_grad for arg in args)
    return checkpoint(function, *args, use_reentrant=reentrant, **kwargs)


def _no_embedding_output_grad(model: PreTrainedModel) -> None:
    """Take off the hooks by which transformers and peft make the input embeddings' output
    require grad when checkpointing is on (for the reentrant form, which needs its input to).
    `checkpoint_layer` needs none, and the gradient made for that output is the first layer's
    input-gradient products spent for nothing. Trained embeddings' output requires grad anyway.
    Found by name: transformers' and peft's hooks are closures, and each call that makes one
    forgets the last (two are left after peft over a full-precision base)."""
    embeddings = model.get_input_embeddings()
    for key, hook in list(embeddings._forward_hooks.items()):
        if getattr(hook, "__name__", "").startswith("make_inputs_require_grad"):
            del embeddings._forward_hooks[key]


def checkpoint_every_nth_layer(model: torch.nn.Module, every: int) -> None:
    """Keep checkpointing on for decoder layers 0, n, 2n, ... only; the others keep their
    activations for backward and are not recomputed.

    Set here rather than through transformers' own `every_n_layers`, which only its newer
    releases take. The same loss and gradients either way: only what backward recomputes
    changes, so memory is traded back for speed where the card has room.
    """
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = layer.gradient_checkpointing and index % every == 0


class LoraAdapter:
    """A peft LoRA adapter and the quantization of the base it sits on.

    Args:
        r: Rank of the update matrices (Axolotl: lora_r).
        alpha: Scale numerator; the update is scaled by alpha / r (lora_alpha).
        dropout: Dropout on the adapter input during training (lora_dropout).
        target_linear: Adapt every linear layer but the output head (lora_target_linear).
        target_modules: Explicit module names, used when target_linear is false.
        fan_in_fan_out: For bases storing weights as (in, out), like GPT-2's Conv1D.
        quantization: A BitsAndBytesConfig (qlora: 4-bit NF4, lora_8bit: 8-bit), or None.
        lora_model_dir: Start from this saved adapter instead of a fresh one.
        upcast_unquantized: Over a 4- or 8-bit base, peft's recipe: the weights left
            unquantized (norms, embeddings, output layer) compute in fp32, which makes the
            residual stream between layers fp32 too; the embedding and output layer keep
            their loaded dtype and compute as fp32 copies would (`loaded_embeddings.py`).
            False keeps them all in the dtype they loaded in, as Axolotl does with flash
            attention: the stream, and the layer inputs gradient checkpointing keeps, take
            half the memory.
        autocast_outputs: Over a 4-bit base, the quantized layers return autocast's dtype as
            nn.Linear does, not their input's: the work between projections runs in bf16
            while the residual stream stays fp32 (`lorafit/model/autocast_outputs.py`).
        fp32_lora_add: Over a 4-bit base under autocast with the fp32 stream, a layer whose
            base output is bf16 (its input was: o_proj after the attention) adds the LoRA
            update to it in fp32 instead of bf16, which would round away updates smaller than
            half a bf16 step of the output (`lorafit/model/lora_branch.py`). No effect with
            autocast_outputs or without upcast_unquantized, whose layers return bf16 by choice.
    """

    def __init__(
        self,
        r: int,
        alpha: float,
        dropout: float,
        target_linear: bool = True,
        target_modules: list[str] | None = None,
        fan_in_fan_out: bool = False,
        quantization: BitsAndBytesConfig | None = None,
        lora_model_dir: str | None = None,
        upcast_unquantized: bool = True,
        autocast_outputs: bool = False,
        fp32_lora_add: bool = True,
    ):
        if not target_linear and not target_modules:
            raise ConfigError("adapter.target_modules is empty and adapter.target_linear is false")
        self.config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=ALL_LINEAR if target_linear else list(target_modules),
            fan_in_fan_out=fan_in_fan_out,
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.quantization = quantization
        self.lora_model_dir = lora_model_dir
        self.upcast_unquantized = upcast_unquantized
        self.autocast_outputs = autocast_outputs
        self.fp32_lora_add = fp32_lora_add

    @property
    def bits(self) -> int | None:
        return quantization_bits(self.quantization)

    def apply(
        self,
        model: PreTrainedModel,
        gradient_checkpointing: bool,
        checkpoint_every: int = 1,
        reentrant: bool = True,
    ) -> PeftModel:
        """Freeze the base and attach the adapter; only adapter weights require grad. With
        checkpointing, every `checkpoint_every`-th decoder layer recomputes its activations,
        in torch's reentrant checkpoint or, with `reentrant` false, its non-reentrant one."""
        quantized = self.bits is not None
        loaded = {name: p.dtype for name, p in model.named_parameters()} if quantized else {}
        if gradient_checkpointing:
            _enable_gradient_checkpointing(model, quantized, checkpoint_every, reentrant)
        elif quantized:
            prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if quantized and not self.upcast_unquantized:
            for name, p in model.named_parameters():
                if p.dtype != loaded[name]:
                    # Back from peft's fp32 copy: exact, every value came from this dtype.
                    p.data = p.data.to(loaded[name])
        elif quantized:
            keep_embeddings_as_loaded(model, loaded)  # the same numbers in half the memory
        if self.lora_model_dir:
            adapted = PeftModel.from_pretrained(model, Path(self.lora_model_dir), is_trainable=True)
        else:
            adapted = get_peft_model(model, self.config)
        if gradient_checkpointing and reentrant:
            _no_embedding_output_grad(model)
        fuse_lora_dropout(adapted)  # same masks and losses, less kept for backward
        fuse_lora_branches(adapted)  # 4-bit layers: the same numbers in fewer operators
        fuse_swiglu(adapted)  # the same numbers, one MLP-wide tensor less kept a layer
        fuse_rms_norm(adapted)  # fp32 norms: the same numbers in fewer backward passes
        if self.autocast_outputs and self.bits == 4:
            return_autocast_dtype(adapted)
        elif self.fp32_lora_add and self.upcast_unquantized:
            add_updates_in_fp32(adapted)  # updates below bf16's step still reach the stream
        return adapted


class FullFineTune:
    """Train every weight of the base model (`adapter=none`); checkpoints hold the full model."""

    quantization = None
    bits = None

    def apply(
        self,
        model: PreTrainedModel,
        gradient_checkpointing: bool,
        checkpoint_every: int = 1,
        reentrant: bool = True,
    ) -> PreTrainedModel:
        if gradient_checkpointing:
            _enable_gradient_checkpointing(model, False, checkpoint_every, reentrant)
        model.requires_grad_(True)
        fuse_swiglu(model)  # the same numbers, one MLP-wide tensor less kept a layer
        return model


def trainable_parameters(model: torch.nn.Module) -> dict[str, Any]:
    """Parameter count summary for the log: trainable, total and their ratio."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "share": trainable / max(total, 1)}
