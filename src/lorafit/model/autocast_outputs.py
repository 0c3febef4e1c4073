"""`adapter.autocast_outputs`: 4-bit projections that return autocast's dtype, as nn.Linear does.

bitsandbytes' 4-bit layer multiplies in its compute dtype (bf16) and casts the product back to
its input's dtype. Under peft's recipe (`adapter.upcast_unquantized`, the default) the norms
are fp32, so the inputs of q, k, v, gate and up are fp32 and so are their outputs: the
attention's queries, keys and values and the MLP's intermediate (14,336 values a token for
Mistral-7B) are fp32 tensors, each made by a cast, carried through fp32 elementwise passes (the
LoRA add, the activation and its product) and cast to bf16 again by the next matmul. Under
autocast an nn.Linear returns bf16 instead. With this option the 4-bit layers do the same: their
input is cast to autocast's dtype before them (the cast bitsandbytes makes inside anyway), so
they return it, and the work between the projections runs in bf16. The residual stream between
the layers, and what checkpointing keeps, stay fp32: that is the difference from
`adapter.upcast_unquantized=false`, which moved the loss by 0.2-0.3% on an H200.

The numbers are those of an nn.Linear over the dequantized weights under autocast, rounded where
a bf16 model rounds; loss and speed on a GPU are to be measured (lever `autocast-outputs` in
bench/peers.py). No effect without autocast, or on 8-bit layers.
"""

from __future__ import annotations

import torch
from bitsandbytes.nn import Linear4bit
from torch import nn


def _to_autocast_dtype(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if x.dtype != dtype:
            return (x.to(dtype), *args[1:])
    return None


def return_autocast_dtype(model: nn.Module) -> int:
    """Cast the input of each bitsandbytes 4-bit layer to autocast's dtype when autocast runs;
    returns how many layers."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.register_forward_pre_hook(_to_autocast_dtype)
    return len(layers)
