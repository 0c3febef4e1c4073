"""Sample packing: several examples share one row, and never see each other.

Short instruction examples padded to a common length waste most of a batch on padding.
Packing fills each row with whole examples instead (first-fit decreasing, never splitting one),
and keeps them apart: position ids restart at 0 for every example, and with no attention mask
transformers turns the restarts into a block-diagonal causal mask. For a row holding examples
A (3 tokens), B (2 tokens) and C (3 tokens), padded to 10:

    tokens        a0 a1 a2 b0 b1 c0 c1 c2 __ __
    position_ids   0  1  2  0  1  0  1  2  0  1     <- restarts mark the boundaries
    labels         -  l  l  -  l  -  l  l  -  -     <- each example's first token never
                                                       learns from its predecessor's last
    attention (row = query, x = may attend):
        a0  x
        a1  x x
        a2  x x x
        b0        x
        b1        x x
        c0            x
        c1            x x
        c2            x x x
        __                  x          padding is one more "example", ignored by the loss
        __                  x x

The loss of a packed row therefore equals the sum of the examples' losses run one by one;
`lorafit.model.isolation.check_isolation` proves it on real rows before training starts.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from lorafit.constants import IGNORE_INDEX, ISOLATING_BACKENDS
from lorafit.data.batching import stack_padded
from lorafit.errors import PackingError

# Attention implementations that isolate packed examples given restarted position ids and no
# mask: the mask builders of sdpa and eager, and flash-attention's varlen kernels.


def check_backend(attn_implementation: str) -> None:
    """Refuse an attention implementation that would let packed examples attend to each other."""
    if attn_implementation not in ISOLATING_BACKENDS:
        raise PackingError(
            f"model.attn_implementation={attn_implementation!r} cannot isolate packed examples; "
            f"use one of {', '.join(ISOLATING_BACKENDS)} or set data.sample_packing=false"
        )


def pack_rows(lengths: Sequence[int], capacity: int, probe: int = 64) -> list[list[int]]:
    """Group example indices into rows of at most `capacity` tokens, never splitting one.

    First-fit decreasing, one row at a time: each row takes the longest remaining example
    that fits, and, once an exact finish is possible, finishes exactly: an example of the
    remaining size, or one whose leftover is itself an available size (among the `probe`
    longest candidates). Otherwise it keeps room for two more examples, so that rows rarely
    end with a gap shorter than every example left. On alpaca-like data this reaches
    ceil(total / capacity) + 1 rows at 2048 and 8192 tokens (see docs/benchmarks.md); packing
    52k examples takes about 0.15 s.
    """
    if any(n > capacity for n in lengths):
        raise ValueError(f"an example is longer than the row capacity {capacity}")
    buckets: dict[int, list[int]] = {}
    for index, size in enumerate(lengths):
        buckets.setdefault(size, []).append(index)
    sizes = sorted(buckets)  # the distinct lengths still available, ascending

    def take(size: int) -> int:
        members = buckets[size]
        index = members.pop()
        if not members:
            del buckets[size]
            sizes.pop(bisect.bisect_left(sizes, size))
        return index

    def finishes(size: int, gap: int) -> bool:
        rest = gap - size
        return rest in buckets and (rest != size or len(buckets[size]) > 1)

    def largest_up_to(limit: int) -> int:
        return bisect.bisect_right(sizes, limit) - 1

    rows: list[list[int]] = []
    while sizes:
        gap, row = capacity, []
        while sizes and gap >= sizes[0]:
            if gap in buckets:
                size = gap
            else:
                top = largest_up_to(gap - sizes[0])
                candidates = (sizes[a] for a in range(top, max(top - probe, -1), -1))
                size = next((c for c in candidates if finishes(c, gap)), None)
                if size is None:
                    roomy = largest_up_to(gap - 2 * sizes[0])
                    at = roomy if roomy >= 0 else top if top >= 0 else largest_up_to(gap)
                    size = sizes[at]
            row.append(take(size))
            gap -= size
        rows.append(row)
    return rows


def pack_row(examples: Sequence[dict[str, list[int]]]) -> dict[str, list[int]]:
    """Concatenate examples into one row with restarting position ids."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for example in examples:
        input_ids += example["input_ids"]
        # Unpacked, an example's first label is never used (logits at t predict label t + 1);
        # packed, it would be predicted from the previous example's last token.
        labels += [IGNORE_INDEX, *example["labels"][1:]]
        position_ids += range(len(example["input_ids"]))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def packed_collate(
    rows: Sequence[dict[str, list[int] | int]], pad_token_id: int, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Stack packed rows, padded to `pad_to` (static shapes) or to the longest row.

    Padding gets position ids of its own, restarting at 0, so it forms a separate block that
    no real token attends to; there is no attention mask, which is what makes transformers
    derive the block-diagonal mask from the position ids.
    """
    batch, lengths = stack_padded(rows, pad_token_id, pad_to, extra=("position_ids",))
    columns = torch.arange(batch["input_ids"].shape[1])
    padding = columns >= lengths[:, None]
    batch["position_ids"] = torch.where(padding, columns - lengths[:, None], batch["position_ids"])
    return batch
