"""Micro-batches that know their optimizer step, so gradient accumulation changes nothing.

A step's loss is the mean over every label token of the global batch. Averaging per-micro-
batch means instead would weight a token by how crowded its micro-batch was, and
(micro 4, accumulate 1) would train differently from (micro 2, accumulate 2). So the sampler
plans whole global batches up front and tags each micro-batch with the global batch's
label-token count: the loss divides a micro-batch's summed token losses by that count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from lorafit.constants import IGNORE_INDEX

# A micro-batch entry as the sampler yields it: (example index, label tokens in its step).
StepItem = tuple[int, int]


def label_tokens(labels: Sequence[int]) -> int:
    """How many positions of an example carry a loss (labels are shifted by one)."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


class StepBatchSampler(Sampler[list[StepItem]]):
    """Yields this rank's micro-batches, global batch after global batch.

    Args:
        label_counts: Label tokens of each example.
        batch_size: Examples per optimizer step, summed over all ranks.
        micro_batch_size: Examples per forward pass on one rank.
        shuffle: Reshuffle each epoch from `seed + epoch` (training); keep order otherwise.
        world_size, rank: This process's place in data-parallel training.
        drop_last: Drop a final global batch smaller than `batch_size` (needed with several
            ranks, where every rank must take the same number of steps).

    `batch_size` must be a multiple of `micro_batch_size * world_size`: the config checks
    (lorafit.config_checks.gradient_accumulation) refuse anything else before a run starts.
    """

    def __init__(
        self,
        label_counts: Sequence[int],
        batch_size: int,
        micro_batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ):
        self.label_counts = list(label_counts)
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.drop_last = drop_last
        self.epoch = 0
        self.skip = 0  # micro-batches of the current epoch already trained (set on resume)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0  # a resume's skip applies to its own epoch only
        self.epoch = epoch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.label_counts)))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.label_counts), generator=generator).tolist()

    def _global_batches(self) -> list[list[int]]:
        order = self._order()
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if batches and len(batches[-1]) < self.batch_size and self.drop_last:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[StepItem]]:
        # Not cleared here: Lightning may create an epoch's iterator more than once.
        for position, micro_batch in enumerate(self._micro_batches()):
            if position >= self.skip:
                yield micro_batch

    def _micro_batches(self) -> Iterator[list[StepItem]]:
        for batch in self._global_batches():
            step_tokens = sum(self.label_counts[i] for i in batch)
            # Contiguous shares keep each rank's micro-batches the same for any world size.
            share = math.ceil(len(batch) / self.world_size)
            mine = batch[self.rank * share : (self.rank + 1) * share]
            for i in range(0, len(mine), self.micro_batch_size):
                yield [(index, step_tokens) for index in mine[i : i + self.micro_batch_size]]

    def steps(self) -> int:
        """Optimizer steps (global batches) in an epoch."""
        return len(self._global_batches())

    def __len__(self) -> int:
        return sum(1 for _ in self._micro_batches())


def stack_padded(
    items: Sequence[dict[str, Any]],
    pad_token_id: int,
    pad_to: int | None = None,
    extra: Sequence[str] = (),
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The padding both collates share: right-pad each item's token lists to the longest item
    (or to `pad_to`) and stack them, with the step's label-token count and the real tokens.

    Padding tokens get `pad_token_id`, labels IGNORE_INDEX (no loss) and `extra` lists 0.
    `step_tokens` is the label-token count of the optimizer step the micro-batch belongs to
    (for validation batches, the batch's own count). Returns the batch and each item's length.
    """
    lengths = torch.tensor([len(item["input_ids"]) for item in items])
    width = pad_to or int(lengths.max())
    fills = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, **dict.fromkeys(extra, 0)}
    batch = {
        key: torch.full((len(items), width), fill, dtype=torch.long) for key, fill in fills.items()
    }
    for row, item in enumerate(items):
        for key in fills:
            batch[key][row, : lengths[row]] = torch.tensor(item[key])
    own = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    batch["step_tokens"] = torch.tensor(items[0]["step_tokens"] or own, dtype=torch.long)
    batch["real_tokens"] = lengths.sum()
    return batch, lengths


def pad_collate(
    items: Sequence[dict[str, list[int] | int]], pad_token_id: int, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest example (or to `pad_to`); padding is masked from
    attention and loss."""
    batch, lengths = stack_padded(items, pad_token_id, pad_to)
    columns = torch.arange(batch["input_ids"].shape[1])
    batch["attention_mask"] = (columns < lengths[:, None]).long()
    return batch


class ResumableLoader(DataLoader):
    """A DataLoader over a StepBatchSampler that Lightning checkpoints and restores.

    Its state is the epoch and how many micro-batches of it training has consumed (counted by
    `count_consumed`, called once per trained batch, so batches prefetched but not yet trained
    are not counted). A run resumed mid-epoch then continues with the very next micro-batch.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.consumed = 0
        self._epoch = -1

    def count_consumed(self) -> None:
        if self._epoch != self.batch_sampler.epoch:
            self._epoch, self.consumed = self.batch_sampler.epoch, 0
        self.consumed += 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.batch_sampler.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.set_epoch(state["epoch"])
        self.batch_sampler.skip = state["consumed"]
        self._epoch, self.consumed = state["epoch"], state["consumed"]
