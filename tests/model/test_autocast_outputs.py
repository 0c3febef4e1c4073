"""`adapter.autocast_outputs`: under autocast the 4-bit layers return autocast's dtype, as
nn.Linear does, so the queries, keys, values and the MLP's intermediate are bf16 while the
residual stream between layers stays fp32; the products are bitsandbytes' own; without
autocast, or with the option off, nothing changes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import four_bit_linear, packed_test_module
from lorafit.model.autocast_outputs import return_autocast_dtype


@pytest.mark.parametrize("autocast", [False, True])
def test_a_4bit_layer_returns_autocast_s_dtype_with_bitsandbytes_product(autocast):
    torch.manual_seed(0)
    layer = four_bit_linear(64, 128)
    torch.manual_seed(0)
    plain = four_bit_linear(64, 128)  # the same weights, no hook
    assert return_autocast_dtype(nn.Sequential(layer)) == 1
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, expected = layer(x), plain(x)
    assert expected.dtype == torch.float32  # bitsandbytes: the input's dtype
    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    # bitsandbytes multiplies in bf16 and casts back: the same values either way
    assert torch.equal(out.float(), expected)


def _dtypes_and_loss(option: bool):
    module = packed_test_module(
        overrides=("adapter=qlora", f"adapter.autocast_outputs={str(option).lower()}")
    )
    layer = module.model.get_base_model().model.layers[0]
    seen = {}

    def note(name, tensor):  # returns None: a hook's return value would replace the output
        seen.setdefault(name, tensor.dtype)

    hooks = [
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, out: note("q", out)),
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: note("intermediate", a[0])),
        layer.register_forward_hook(
            lambda m, a, out: note("stream", out[0] if isinstance(out, tuple) else out)
        ),
    ]
    ids = torch.randint(3, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "position_ids": torch.arange(32)[None], "labels": ids}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, count = module._loss_sum(batch)
    for hook in hooks:
        hook.remove()
    return seen, (loss / count).item()


def test_the_work_between_projections_runs_in_bf16_and_the_stream_in_fp32():
    seen, loss = _dtypes_and_loss(True)
    assert seen == {"q": torch.bfloat16, "intermediate": torch.bfloat16, "stream": torch.float32}
    default, default_loss = _dtypes_and_loss(False)
    assert default == {"q": torch.float32, "intermediate": torch.float32, "stream": torch.float32}
    # The same model and batch: only bf16 rounding apart.
    assert math.isfinite(loss) and abs(loss - default_loss) < 1e-2 * default_loss
