"""The LightningDataModule: load -> check -> split -> format -> tokenize -> loaders.

The data logic itself lives in pure functions (data_sources, prompts, tokenization,
batching); this class only orchestrates them and hands Lightning its loaders.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lorafit.batching import StepBatchSampler, TokenizedDataset, label_tokens, pad_collate
from lorafit.data_sources import DataError, load_alpaca
from lorafit.tokenization import tokenize_alpaca

log = logging.getLogger(__name__)


def split_rows(
    rows: Sequence[dict[str, str]], val_set_size: float | int, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Deterministic train / validation split.

    `val_set_size` below 1 is a fraction (rounded up, as `datasets.train_test_split` does), a
    whole number from 1 up is a count of rows, 0 means no validation. The same rows and seed
    always give the same split.
    """
    if val_set_size < 0 or (isinstance(val_set_size, float) and 1 <= val_set_size):
        raise DataError(f"data.val_set_size={val_set_size}: use a fraction in [0, 1) or a count")
    n_val = math.ceil(len(rows) * val_set_size) if val_set_size < 1 else int(val_set_size)
    if n_val >= len(rows):
        raise DataError(
            f"data.val_set_size={val_set_size} leaves no training rows out of {len(rows)}"
        )
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    val = [rows[i] for i in sorted(order[:n_val])]
    train = [rows[i] for i in sorted(order[n_val:])]
    return train, val


class AlpacaDataModule(pl.LightningDataModule):
    """Alpaca-format instruction data for causal-LM fine-tuning.

    Args:
        datasets: Sources, each `{path, type: alpaca, revision?, split?}`; `path` is a Hub id,
            a local .json / .jsonl / .parquet file, or `builtin:<name>`.
        sequence_len: Longest example in tokens; longer ones are cut at the end.
        val_set_size: Validation share (fraction) or row count; 0 for none.
        train_on_inputs: Also learn the prompt tokens (off: only the response is learned).
        batch_size: Examples per optimizer step over all devices.
        micro_batch_size: Examples per forward pass on one device.
        num_workers: DataLoader worker processes.
        seed: Drives the split and the per-epoch shuffle.
        tokenizer: Set before `setup`; loading rows does not need it.
    """

    def __init__(
        self,
        datasets: Sequence[Mapping[str, Any]],
        sequence_len: int,
        val_set_size: float | int,
        train_on_inputs: bool,
        batch_size: int,
        micro_batch_size: int,
        num_workers: int = 0,
        seed: int = 42,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        super().__init__()
        self.sources = [dict(source) for source in datasets]
        self.sequence_len = sequence_len
        self.val_set_size = val_set_size
        self.train_on_inputs = train_on_inputs
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer = tokenizer
        self.rows: tuple[list[dict[str, str]], list[dict[str, str]]] | None = None
        self.train_set: TokenizedDataset | None = None
        self.val_set: TokenizedDataset | None = None

    def load_rows(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """Load, check and split the rows (once); raises DataError on bad data."""
        if self.rows is None:
            self.rows = split_rows(load_alpaca(self.sources), self.val_set_size, self.seed)
        return self.rows

    def _tokenize(self, rows: list[dict[str, str]], split: str) -> TokenizedDataset:
        examples, stats = tokenize_alpaca(
            rows, self.tokenizer, self.sequence_len, self.train_on_inputs
        )
        if stats.truncated or stats.dropped_no_labels:
            log.warning(
                "%s: %d of %d examples cut to sequence_len=%d, %d dropped (no response left)",
                split,
                stats.truncated,
                len(rows),
                self.sequence_len,
                stats.dropped_no_labels,
            )
        if not examples:
            raise DataError(
                f"the {split} split has no usable example at sequence_len={self.sequence_len}"
            )
        return TokenizedDataset(examples)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.tokenizer is None:
            raise RuntimeError("AlpacaDataModule.tokenizer must be set before setup()")
        train_rows, val_rows = self.load_rows()
        self.train_set = self._tokenize(train_rows, "train")
        self.val_set = self._tokenize(val_rows, "validation") if val_rows else None

    def _loader(self, dataset: TokenizedDataset, train: bool) -> DataLoader:
        trainer = self.trainer
        world_size = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        sampler = StepBatchSampler(
            [label_tokens(example["labels"]) for example in dataset.examples],
            # Validation has no optimizer step: one global batch is one micro-batch per rank.
            self.batch_size if train else self.micro_batch_size * world_size,
            self.micro_batch_size,
            shuffle=train,
            seed=self.seed,
            world_size=world_size,
            rank=rank,
            drop_last=train and world_size > 1,
        )
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=functools.partial(pad_collate, pad_token_id=self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        # An empty list tells Lightning there is no validation (val_set_size: 0).
        return self._loader(self.val_set, train=False) if self.val_set is not None else []
