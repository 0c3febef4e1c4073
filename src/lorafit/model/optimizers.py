"""bitsandbytes' AdamW optimizers (`optimizer=paged_adamw_32bit`, `paged_adamw_8bit`,
`adamw_8bit`) with one wait for the GPU a step instead of one a tensor.

bitsandbytes' step (0.50) calls `torch.cuda.synchronize()` after each parameter's update:
448 times a step for LoRA on the seven projections of Mistral-7B's 32 layers. Each wait
empties the GPU's queue, so the host's work for the next tensor and the GPU's kernel for this
one take turns instead of overlapping, and the kernels that follow the step start from an idle
GPU. On one device nothing needs those waits: every update is a kernel on the same stream,
queued in order, and the paged states' prefetches are stream-ordered too; nothing on the host
reads a state between them. So the updates run as bitsandbytes writes them, the same kernels
with the same arguments (the same numbers, bit for bit: tests/model/test_optimizers.py), and the
step waits once at its end where bitsandbytes waits after paged updates.

Parameters spread over several devices (a model split by `device_map`) keep bitsandbytes'
waits: there a tensor's kernel runs on its own device's stream, which nothing else orders.
"""

from __future__ import annotations

from collections.abc import Callable

import bitsandbytes.optim as bnb_optim
import torch
from bitsandbytes.optim import optimizer as bnb_optimizer


def _no_wait(tensor: torch.Tensor) -> None:
    """In place of bitsandbytes' per-tensor `sync_gpu` during a step on one device."""


class OneWaitPerStep:
    """A bitsandbytes optimizer's step without its wait after each tensor (module docstring)."""

    param_groups: list[dict]

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        # The closure (forward and backward under Lightning) runs before the waits are
        # switched off, as bitsandbytes runs it before its updates.
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        updated = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if len({p.device for p in updated}) != 1:
            super().step()  # type: ignore[misc]
            return loss
        wait = bnb_optimizer.sync_gpu
        bnb_optimizer.sync_gpu = _no_wait
        try:
            super().step()  # type: ignore[misc]
        finally:
            bnb_optimizer.sync_gpu = wait
        if self.is_paged:  # type: ignore[attr-defined]
            wait(updated[-1])
        return loss


class PagedAdamW32bit(OneWaitPerStep, bnb_optim.PagedAdamW32bit):
    """bitsandbytes' PagedAdamW32bit, one wait a step (`optimizer=paged_adamw_32bit`)."""


class PagedAdamW8bit(OneWaitPerStep, bnb_optim.PagedAdamW8bit):
    """bitsandbytes' PagedAdamW8bit, one wait a step (`optimizer=paged_adamw_8bit`)."""


class AdamW8bit(OneWaitPerStep, bnb_optim.AdamW8bit):
    """bitsandbytes' AdamW8bit, one wait a step (`optimizer=adamw_8bit`)."""
