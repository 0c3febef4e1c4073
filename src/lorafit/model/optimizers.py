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

The 32-bit one (`paged_adamw_32bit`) also updates each parameter group in few calls of
bitsandbytes' kernel, each over up to 16M values laid end to end (`FlatUpdates`; six calls a
step for the canonical job), where bitsandbytes makes, for each of the 448 tensors, Python
calls, two prefetches of paged states and a kernel launch: on a GPU at 2048 tokens, host time
the GPU waits on. AdamW in 32 bits updates each value from its own gradient and states alone,
so one call over a concatenation gives each value the bits a call per tensor gives it. The
parameters stay tensors of their own (a checkpoint or an adapter file saves them apart): they
are copied into a run and back, which the GPU does in a few passes. The states live in one
buffer a group, each parameter's state a view of its part, so state dicts have bitsandbytes'
layout, and a state loaded from one is copied into the buffers at the next step. The 8-bit
states are quantized in blocks within each tensor, so those optimizers keep a call per
tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import bitsandbytes.functional as bnb_functional
import bitsandbytes.optim as bnb_optim
import torch
from bitsandbytes.optim import optimizer as bnb_optimizer


def _no_wait(tensor: torch.Tensor) -> None:
    """In place of bitsandbytes' per-tensor `sync_gpu` during a step on one device."""


def _closure_loss(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """The closure's loss, run with grad as bitsandbytes runs it before its updates."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class OneWaitPerStep:
    """A bitsandbytes optimizer's step without its wait after each tensor (module docstring)."""

    param_groups: list[dict]

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        # The closure (forward and backward under Lightning) runs before the waits are
        # switched off, as bitsandbytes runs it before its updates.
        loss = _closure_loss(closure)
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


# The values one update call takes at most (a parameter larger goes alone): the two temporaries
# of a call hold 2 x 64 MiB, where a whole group's would hold twice its trained weights (0.62 GiB
# for the canonical job's LoRA); six calls a step for it.
RUN_VALUES = 2**24


def _runs(params: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """`params` in order, cut into runs of at most `limit` values (or one parameter)."""
    runs: list[list[torch.Tensor]] = [[]]
    total = 0
    for p in params:
        if runs[-1] and total + p.numel() > limit:
            runs.append([])
            total = 0
        runs[-1].append(p)
        total += p.numel()
    return runs


class FlatUpdates(OneWaitPerStep):
    """A 32-bit bitsandbytes optimizer's step as a kernel call a run of up to `RUN_VALUES`
    values (module docstring). Where that would not give bitsandbytes' numbers (per-parameter
    settings, update norms, a parameter without gradient, states of unequal step counts) it
    takes `OneWaitPerStep`'s, a call a tensor; `flat=False` always does (the bench's baseline)."""

    state: dict
    args: object
    mng: object
    optimizer_name: str
    is_paged: bool

    def __init__(self, *args, flat: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.flat = flat
        # Per parameter group: its states' two buffers.
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = _closure_loss(closure)
        groups = [[p for p in g["params"] if p.grad is not None] for g in self.param_groups]
        if not self.flat or not all(self._flat_fits(g, i) for i, g in enumerate(groups)):
            super().step()
            return loss
        if not self.initialized:  # what bitsandbytes' step does first
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for index, params in enumerate(groups):
            if params:
                self._update_group(index, params)
        if self.is_paged and any(groups):
            bnb_optimizer.sync_gpu(next(p for g in groups for p in g))
        return loss

    def _flat_fits(self, params: list[torch.Tensor], index: int) -> bool:
        group = self.param_groups[index]
        if len(params) != len(group["params"]):
            return False  # bitsandbytes skips those without gradient: their steps would part
        if not params:
            return True
        if self.args.optim_bits != 32 or self.args.max_unorm > 0:
            return False
        overrides = self.mng.index2config, self.mng.pid2config
        if any((index, i) in overrides[0] or id(p) in overrides[1] for i, p in enumerate(params)):
            return False
        if len({p.device for p in params}) > 1 or len({len(self.state[p]) for p in params}) > 1:
            return False
        if any(p.dtype != torch.float32 or p.grad.dtype != torch.float32 for p in params):
            return False
        return len({self.state[p].get("step") for p in params}) == 1

    def _update_group(self, index: int, params: list[torch.Tensor]) -> None:
        first, second = self._linked(index, params)
        if getattr(first, "is_paged", False):
            bnb_functional.prefetch_tensor(first)
            bnb_functional.prefetch_tensor(second)
        step = self.state[params[0]]["step"] + 1
        start = 0
        for run in _runs(params, RUN_VALUES):
            end = start + sum(p.numel() for p in run)
            states = first[start:end], second[start:end]
            self._update_run(self.param_groups[index], run, *states, step)
            start = end
        for p in params:
            self.state[p]["step"] = step

    def _update_run(
        self,
        group: dict,
        params: list[torch.Tensor],
        first: torch.Tensor,
        second: torch.Tensor,
        step: int,
    ) -> None:
        """Consecutive parameters updated by one kernel call, laid end to end in two
        temporaries (their gradients, their values) and the values copied back."""
        grads = torch.cat([p.grad.reshape(-1) for p in params])
        values = torch.cat([p.reshape(-1) for p in params])
        betas = group["betas"]
        bnb_functional.optimizer_update_32bit(
            self.optimizer_name,
            grads,
            values,
            first,
            betas[0],
            group["eps"],
            step,
            group["lr"],
            second,
            betas[1],
            betas[2] if len(betas) >= 3 else 0.0,
            group.get("alpha", 0.0),
            group["weight_decay"],
            1.0,
            None,
            max_unorm=0.0,
            skip_zeros=self.args.skip_zeros,
        )
        parts = values.split([p.numel() for p in params])
        parts = [part.view_as(p) for part, p in zip(parts, params, strict=True)]
        torch._foreach_copy_(params, parts)

    def _linked(self, index: int, params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's state buffers, with each parameter's states views of its part: made at
        the first step, and linked again (the states copied in) where they are not, as after a
        state dict was loaded. Buffers of the group's size are reused: bitsandbytes never frees
        paged memory, so new ones would hold a second copy to the end of the process."""
        buffers = self._buffers.get(index)
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        if buffers is not None and all(
            self.state[p].get("state1") is not None
            and self.state[p]["state1"].data_ptr() == buffers[0][start:].data_ptr()
            and self.state[p]["state2"].data_ptr() == buffers[1][start:].data_ptr()
            for p, start in zip(params, offsets[:-1], strict=True)
        ):
            return buffers
        if buffers is None:
            buffers = (self._buffer(offsets[-1], params[0]), self._buffer(offsets[-1], params[0]))
        for p, start, end in zip(params, offsets[:-1], offsets[1:], strict=True):
            state = self.state[p]
            for key, buffer in zip(("state1", "state2"), buffers, strict=True):
                part = buffer[start:end].view_as(p)
                if key not in state:
                    part.zero_()
                elif state[key].data_ptr() != part.data_ptr():
                    part.copy_(state[key])
                state[key] = part
            state.setdefault("step", 0)
        self._buffers[index] = buffers
        return buffers

    def _buffer(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A zeroed fp32 state buffer, paged as bitsandbytes pages a state of that size."""
        if not self._pages(numel, like):
            return torch.zeros(numel, dtype=torch.float32, device=like.device)
        buffer = bnb_functional.get_paged(numel, dtype=torch.float32, device=like.device)
        bnb_functional.fill(buffer, 0)
        self.page_mng.paged_tensors.append(buffer)
        return buffer

    def _pages(self, numel: int, like: torch.Tensor) -> bool:
        """Whether a state buffer of `numel` values goes to paged memory, as bitsandbytes
        decides for a state of that size."""
        return self.is_paged and like.device.type != "cpu" and numel >= 1e5


class PagedAdamW32bit(FlatUpdates, bnb_optim.PagedAdamW32bit):
    """bitsandbytes' PagedAdamW32bit, a call a run of parameters and one wait a step
    (`optimizer=paged_adamw_32bit`)."""


class PagedAdamW8bit(OneWaitPerStep, bnb_optim.PagedAdamW8bit):
    """bitsandbytes' PagedAdamW8bit, one wait a step (`optimizer=paged_adamw_8bit`)."""


class AdamW8bit(OneWaitPerStep, bnb_optim.AdamW8bit):
    """bitsandbytes' AdamW8bit, one wait a step (`optimizer=adamw_8bit`)."""
