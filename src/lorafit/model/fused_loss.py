"""The output layer and cross entropy in one pass, over the labelled positions only.

The plain path computes logits for every position of the batch (tokens x vocabulary: 100 MB
in fp32 for one 512-token row of SmolLM2's 49k vocabulary, 1 GB for an 8192-token row of
Mistral's 32k), upcasts them, and keeps them (and the softmax) until backward. Here the
hidden states of the positions that carry a label are taken alone (prompt tokens and padding
cost nothing), and the output layer runs over them in chunks: each chunk's logits give the
chunk's loss and, at once, its gradient with respect to the hidden states, and are freed. What
backward keeps is one hidden-size gradient per labelled token. Same loss, same gradients, up
to float rounding; `tests/model/test_fused_loss.py` holds it to the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafit.constants import IGNORE_INDEX
from lorafit.model.loaded_embeddings import as_multiplied


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T, targets), gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):  # noqa: ANN001, ANN205
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            t = targets[start : start + chunk_size]
            # As the plain path: the matmul in the compute dtype (bf16 under autocast), then fp32.
            logits = (h @ weight.T).float()
            # One normalisation serves both: the loss reads log-probabilities, the gradient
            # their exponent (a second softmax over the vocabulary cost as much again).
            log_probs = logits.log_softmax(-1)
            del logits
            total += F.nll_loss(log_probs, t, reduction="sum")
            if want_hidden or want_weight:
                # d(sum of cross entropy)/d(logits) = softmax - one_hot(target)
                probs = log_probs.exp_()
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1
                probs = probs.to(h.dtype)
                if want_hidden:
                    grad_hidden[start : start + chunk_size] = probs @ weight
                if want_weight:
                    grad_weight += (probs.T @ h).float()
        ctx.save_for_backward(
            grad_hidden if want_hidden else None,
            grad_weight if want_weight else None,
        )
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: ANN001, ANN205
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype),
            None,
            None,
        )


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Mask of the positions whose logits are scored: those whose next label is learned."""
    return labels[:, 1:] != IGNORE_INDEX


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross entropy of `hidden @ weight.T` over labelled positions, and
    how many there were: `lorafit.model.losses.token_loss_sum` without the full logits.

    `hidden` is [batch, tokens, hidden], `weight` the output layer's [vocab, hidden], `labels`
    [batch, tokens] with IGNORE_INDEX where nothing is learned.
    """
    weight = as_multiplied(weight, hidden)  # a kept half output layer (loaded_embeddings.py)
    scored = labelled_positions(labels)
    chosen = hidden[:, :-1][scored]
    targets = labels[:, 1:][scored]
    if targets.numel() == 0:
        return (hidden.sum() * 0.0).float(), 0
    return _LinearCrossEntropy.apply(chosen, weight, targets, chunk_size), int(targets.numel())
