"""`sdpa_packed`: attention for packed rows one example at a time, with no block mask.

With `sdpa`, transformers turns a packed row's restarting position ids into a dense
tokens x tokens block-diagonal mask, and torch's fused attention cannot take its causal fast
path with a mask: it computes (and keeps for backward) every query-key score of the row,
including the blocks between examples that the mask throws away. Here each example of the row
(each run of consecutive position ids) is attended on its own, causally, so nothing crosses an
example boundary by construction:

- on CUDA in half precision or under half autocast, where torch has `varlen_attn`, the whole
  batch in one flash-attention call over the examples' cumulative lengths (what flash-attn's
  varlen kernels do, with no extra package);
- elsewhere, one `scaled_dot_product_attention(is_causal=True)` call per example; on a CPU
  without AMX, half precision inputs are attended in fp32 and the output rounded back, since
  there torch's CPU flash kernel runs slower in bf16 than in fp32 (`bench/packed_attention.py
  --tokens 512 --heads 9 3 64 --dtype bfloat16`, docs/benchmarks.md).

The example spans are found once per forward, not once per layer: every layer (and the
recomputation of checkpointed layers) receives the same position-ids tensor, and the spans of
the last one seen are kept while that tensor lives. Rows with a padding mask, and generation
with a cache, go through the plain `sdpa` path unchanged. A model's sliding window (Mistral's
4096) is kept: an example longer than the window attends within it, as with `sdpa`.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_packed"


@dataclass(frozen=True)
class Spans:
    """The packed examples of a batch: per row, [start, end) of each run of consecutive
    position ids; and the same flattened over the batch as flash attention's cumulative
    lengths (int32, on the tensors' device) with the longest example."""

    rows: list[list[tuple[int, int]]]
    cu_seqlens: torch.Tensor
    longest: int


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) spans of consecutive position ids: the packed examples."""
    restarts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    length = position_ids.shape[1]
    spans = []
    for row in restarts.cpu():  # the one host copy of a forward (see `spans_of`)
        starts = [0, *(row.nonzero().flatten() + 1).tolist()]
        spans.append(list(zip(starts, [*starts[1:], length], strict=True)))
    return spans


_last: tuple[weakref.ref, Spans] | None = None


def spans_of(position_ids: torch.Tensor, batch: int | None = None) -> Spans:
    """`Spans` of a [rows, tokens] position-ids tensor, its one row repeated when it has one and
    `batch` asks for more (as a model that made its own position ids passes them), computed
    once while the tensor lives.

    The tensor itself is the key (a weak reference, so a new tensor at a freed address is never
    taken for the old one), which makes the one host synchronisation per forward, not per layer.
    """
    global _last
    batch = batch or position_ids.shape[0]
    if _last is not None and _last[0]() is position_ids and len(_last[1].rows) == batch:
        return _last[1]
    rows = segments(position_ids.expand(batch, -1))
    length = position_ids.shape[1]
    bounds = [r * length + b for r, row in enumerate(rows) for _, b in row]
    cu = torch.tensor([0, *bounds], dtype=torch.int32, device=position_ids.device)
    longest = max(b - a for row in rows for a, b in row)
    spans = Spans(rows, cu, longest)
    _last = (weakref.ref(position_ids), spans)
    return spans


@functools.cache
def _varlen():
    """torch's flash-attention varlen entry point and the keywords this torch takes, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _window(sliding_window: int | None, longest: int) -> int | None:
    """The left window a query may see besides itself, when it can matter."""
    if sliding_window is None or sliding_window <= 0 or longest <= sliding_window:
        return None
    return sliding_window - 1


HALF = (torch.float16, torch.bfloat16)


def half_dtype(tensor: torch.Tensor) -> torch.dtype | None:
    """The half precision attention on `tensor` computes in: its own dtype, or under autocast
    (fp32 activations, as with Lightning's bf16-mixed) the autocast dtype, which is what
    `scaled_dot_product_attention` would cast to. None when it computes in full precision."""
    if tensor.dtype in HALF:
        return tensor.dtype
    kind = tensor.device.type
    if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) in HALF:
        return torch.get_autocast_dtype(kind)
    return None


@functools.cache
def cpu_attends_half_in_fp32() -> bool:
    """Whether half precision attention on this CPU runs in fp32: where it has no AMX tiles,
    torch's CPU flash attention converts every bf16 block to fp32 on its own and then runs
    slower than fp32 inputs do. With AMX the half kernel is the fast one."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return not (amx is not None and amx())


def _varlen_fits(dtype: torch.dtype | None, window: int | None) -> bool:
    """Whether this torch's varlen flash kernel can do the call: half precision, and a
    sliding window only where it takes one."""
    kernel = _varlen()
    if kernel is None or dtype not in HALF:
        return False
    return window is None or "window_size" in kernel[1]


def _varlen_attention(query, key, value, spans: Spans, scaling, window, dtype) -> torch.Tensor:
    varlen_attn, takes = _varlen()
    # [batch, heads, tokens, dim] -> [batch * tokens, heads, dim], examples end to end, in the
    # half precision autocast would give (the kernel is a custom op autocast does not cast).
    q, k, v = (t.transpose(1, 2).flatten(0, 1).to(dtype) for t in (query, key, value))
    options = {}
    if query.shape[1] != key.shape[1]:
        if "enable_gqa" in takes:
            options["enable_gqa"] = True
        else:  # an older torch: one key/value head per query head
            groups = query.shape[1] // key.shape[1]
            k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    if "window_size" in takes:
        options["window_size"] = (-1 if window is None else window, 0)
    else:  # an older torch: causal only (`_varlen_fits` keeps windows that cut in away)
        options["is_causal"] = True
    if scaling is not None and "scale" in takes:
        options["scale"] = scaling
    elif scaling is not None:
        q = q * (scaling * q.shape[-1] ** 0.5)  # the kernel's own scale is 1/sqrt(dim)
    out = varlen_attn(
        q, k, v, spans.cu_seqlens, spans.cu_seqlens, spans.longest, spans.longest, **options
    )
    return out.view(query.shape[0], query.shape[2], *out.shape[1:])


def _causal(q, k, v, scaling, gqa, window, dropout) -> torch.Tensor:
    """One example: the fused causal kernel, or a banded mask where the window cuts in."""
    length = q.shape[2]
    if window is None or length <= window + 1:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa
        )
    index = torch.arange(length, device=q.device)
    seen = index[None, :] <= index[:, None]
    seen &= index[None, :] >= index[:, None] - window
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=seen, dropout_p=dropout, scale=scaling, enable_gqa=gqa
    )


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention output as transformers' attention functions return it: [batch, tokens,
    heads, head_dim]. Query, key and value are [batch, heads, tokens, head_dim]."""
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            sliding_window=sliding_window,
            **kwargs,
        )
    spans = spans_of(position_ids, batch=query.shape[0])
    window = _window(sliding_window, spans.longest)
    half = half_dtype(query)
    if query.is_cuda and dropout == 0 and _varlen_fits(half, window):
        return _varlen_attention(query, key, value, spans, scaling, window, half), None
    if query.device.type == "cpu" and half is not None and cpu_attends_half_in_fp32():
        # In fp32 with autocast off (it would cast back down), then the dtype the half path
        # returns; backward makes fp32 gradients and casts them to the inputs' dtypes.
        with torch.autocast("cpu", enabled=False):
            q, k, v = (t.float() for t in (query, key, value))
            out = _per_example(q, k, v, spans, scaling, window, dropout)
        return out.to(half), None
    return _per_example(query, key, value, spans, scaling, window, dropout), None


def _per_example(query, key, value, spans: Spans, scaling, window, dropout) -> torch.Tensor:
    """[batch, tokens, heads, head_dim]: one fused causal call per packed example."""
    gqa = query.shape[1] != key.shape[1]  # grouped-query attention without copying heads
    rows = []
    for index, row in enumerate(spans.rows):
        q, k, v = (t[index : index + 1] for t in (query, key, value))
        parts = [
            _causal(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scaling, gqa, window, dropout)
            for a, b in row
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous()


def _mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    # No padding: no mask at all (the attention finds the examples from the position ids).
    # Padding: sdpa's mask, for the plain sdpa path the attention then takes.
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Make `attn_implementation="sdpa_packed"` known to transformers (before a model loads)."""
    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, _mask)
