"""`sdpa_packed`: attention for packed rows one example at a time, with no block mask.

With `sdpa`, transformers turns a packed row's restarting position ids into a dense
tokens x tokens block-diagonal mask, and torch's fused attention cannot take its causal fast
path with a mask: it computes (and keeps for backward) every query-key score of the row,
including the blocks between examples that the mask throws away. Here each example of the row
(each run of consecutive position ids) is attended on its own with `is_causal=True`, so the
fused kernel runs and nothing crosses an example boundary by construction. Rows with a padding
mask, and generation with a cache, go through the plain `sdpa` path unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_packed"


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) spans of consecutive position ids: the packed examples."""
    restarts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    length = position_ids.shape[1]
    spans = []
    for row in restarts.cpu():
        starts = [0, *(row.nonzero().flatten() + 1).tolist()]
        spans.append(list(zip(starts, [*starts[1:], length], strict=True)))
    return spans


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention output as transformers' attention functions return it: [batch, tokens,
    heads, head_dim]. Query, key and value are [batch, heads, tokens, head_dim]."""
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # Grouped-query attention without copying the key and value heads.
    gqa = query.shape[1] != key.shape[1]
    position_ids = position_ids.expand(query.shape[0], -1)
    rows = []
    for index, spans in enumerate(segments(position_ids)):
        q, k, v = (t[index : index + 1] for t in (query, key, value))
        parts = [
            F.scaled_dot_product_attention(
                q[:, :, a:b],
                k[:, :, a:b],
                v[:, :, a:b],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
            for a, b in spans
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


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
