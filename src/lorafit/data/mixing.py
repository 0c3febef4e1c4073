"""Source weights: each source's share of the training rows (`data.datasets.<i>.weight`).

The mixture keeps the training split's size. A source given a larger share than its rows fill
is repeated (whole passes, then a seeded draw for the rest); a smaller share is a seeded draw
without repetition. Validation rows are never mixed: they measure every source as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lorafit.errors import DataError


def shares(weights: Sequence[float], total: int) -> list[int]:
    """`total` rows split in proportion to `weights`, whole numbers summing to `total`
    (largest remainders get the rows rounding leaves over)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mix(
    indices: Sequence[int], owners: Sequence[int], weights: Sequence[float], seed: int
) -> list[int]:
    """The row indices of the mixture: `indices` are the training rows, `owners[i]` the source
    of row i, `weights[s]` source s's weight. The same inputs always give the same mixture."""
    generator = torch.Generator().manual_seed(seed)
    by_source: list[list[int]] = [[] for _ in weights]
    for index in indices:
        by_source[owners[index]].append(index)
    mixture: list[int] = []
    for source, (members, wanted) in enumerate(
        zip(by_source, shares(weights, len(indices)), strict=True)
    ):
        if wanted and not members:
            raise DataError(
                f"data.datasets.{source} has weight {weights[source]} but no training rows"
            )
        passes, rest = divmod(wanted, len(members)) if members else (0, 0)
        drawn = torch.randperm(len(members), generator=generator)[:rest].sort().values.tolist()
        mixture += members * passes + [members[i] for i in drawn]
    return mixture
