"""The training loss: next-token cross entropy, summed, over labelled positions only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafit.constants import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross entropy over labelled positions, and how many there were.

    Summing (rather than averaging) lets the caller divide by the token count of a whole
    optimizer step, however the step is split into micro-batches.
    """
    targets = labels[:, 1:].reshape(-1)
    losses = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),
        targets,
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return losses, int((targets != IGNORE_INDEX).sum())
