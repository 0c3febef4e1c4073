"""The LightningDataModule: load -> check -> split -> format -> tokenize -> loaders.

The data logic itself lives in pure functions (data_sources, prompts, tokenization,
batching); this class only orchestrates them and hands Lightning its loaders.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lorafit.data import prepared_cache
from lorafit.data.batching import ResumableLoader, StepBatchSampler, pad_collate
from lorafit.data.examples import PackedExamples, TokenizedExamples
from lorafit.data.packing import pack_rows, packed_collate
from lorafit.data.prepared_cache import PreparedSplit
from lorafit.data.sources import load_alpaca
from lorafit.data.tokenization import tokenize_alpaca
from lorafit.errors import DataError

log = logging.getLogger(__name__)


def split_rows(
    rows: Sequence[dict[str, str]], val_set_size: float | int, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Deterministic train / validation split.

    `val_set_size` below 1 is a fraction (rounded up, as `datasets.train_test_split` does), a
    whole number from 1 up is a count of rows, 0 means no validation. The same rows and seed
    always give the same split. The value's range is checked with the rest of the config
    (lorafit.config_checks); what is checked here is what only the rows can tell.
    """
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
        sequence_len: Longest example (or packed row) in tokens.
        val_set_size: Validation share (fraction) or row count; 0 for none.
        train_on_inputs: Also learn the prompt tokens (off: only the response is learned).
        batch_size: Examples (packed: rows) per optimizer step over all devices.
        micro_batch_size: Examples (packed: rows) per forward pass on one device.
        sample_packing: Pack several examples into each row of `sequence_len` tokens.
        pad_to_sequence_len: Pad every batch to exactly `sequence_len` (static shapes).
        overlong: Examples longer than `sequence_len`: "truncate" (cut the end) or "drop".
        dataset_prepared_path: Folder of the prepared-data cache; None to always tokenize.
        num_workers: DataLoader worker processes.
        seed: Drives the split and the per-epoch shuffle.

    Loading and checking rows needs no tokenizer; `connect` hands it over before `setup`.
    """

    def __init__(
        self,
        datasets: Sequence[Mapping[str, Any]],
        sequence_len: int,
        val_set_size: float | int,
        train_on_inputs: bool,
        batch_size: int,
        micro_batch_size: int,
        sample_packing: bool = False,
        pad_to_sequence_len: bool = False,
        overlong: str = "truncate",
        dataset_prepared_path: str | None = None,
        num_workers: int = 0,
        seed: int = 42,
    ):
        super().__init__()
        self.sources = [dict(source) for source in datasets]
        self.sequence_len = sequence_len
        self.val_set_size = val_set_size
        self.train_on_inputs = train_on_inputs
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size
        self.sample_packing = sample_packing
        self.pad_to_sequence_len = pad_to_sequence_len
        self.overlong = overlong
        self.dataset_prepared_path = dataset_prepared_path
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.rows: tuple[list[dict[str, str]], list[dict[str, str]]] | None = None
        self.splits: dict[str, PreparedSplit] | None = None
        self.prepared_from_cache = False
        self.cache_key: str | None = None

    def connect(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Hand over the model's tokenizer: the one thing the data needs from the model side."""
        self.tokenizer = tokenizer

    def load_rows(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """Load, check and split the rows (once); raises DataError on bad data."""
        if self.rows is None:
            self.rows = split_rows(load_alpaca(self.sources), self.val_set_size, self.seed)
        return self.rows

    def settings(self) -> dict[str, Any]:
        """Every setting that changes the prepared data (the cache key includes them all)."""
        return {
            "sequence_len": self.sequence_len,
            "val_set_size": self.val_set_size,
            "train_on_inputs": self.train_on_inputs,
            "sample_packing": self.sample_packing,
            "overlong": self.overlong,
            "seed": self.seed,
        }

    def _prepare(self, rows: list[dict[str, str]], split: str) -> PreparedSplit:
        examples, stats = tokenize_alpaca(
            rows, self.tokenizer, self.sequence_len, self.train_on_inputs, self.overlong
        )
        dropped = stats.dropped_no_labels + stats.dropped_overlong
        if stats.truncated or dropped:
            log.warning(
                "%s: of %d examples longer than sequence_len=%d, %d were cut and %d dropped",
                split,
                len(rows),
                self.sequence_len,
                stats.truncated,
                dropped,
            )
        if not examples:
            raise DataError(
                f"the {split} split has no usable example at sequence_len={self.sequence_len}"
            )
        flat = TokenizedExamples.from_lists(examples)
        if not self.sample_packing:
            return PreparedSplit(flat, None)
        return PreparedSplit(flat, pack_rows(flat.lengths().tolist(), self.sequence_len))

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        if self.tokenizer is None:
            raise RuntimeError("call AlpacaDataModule.connect(tokenizer) before setup()")
        train_rows, val_rows = self.load_rows()

        def prepare() -> dict[str, PreparedSplit]:
            splits = {"train": self._prepare(train_rows, "train")}
            if val_rows:
                splits["validation"] = self._prepare(val_rows, "validation")
            return splits

        if self.dataset_prepared_path:
            key = prepared_cache.cache_key([train_rows, val_rows], self.tokenizer, self.settings())
            self.cache_key = key
            self.splits, self.prepared_from_cache = prepared_cache.load_or_build(
                Path(self.dataset_prepared_path), key, prepare
            )
        else:
            self.splits = prepare()
        if self.sample_packing:
            train = self.splits["train"]
            log.info(
                "packed %d examples into %d rows of at most %d tokens (%.1f%% filled)",
                len(train.examples),
                len(train.rows),
                self.sequence_len,
                100 * len(train.examples.input_ids) / (len(train.rows) * self.sequence_len),
            )

    def dataset(self, split: str) -> TokenizedExamples | PackedExamples | None:
        """The examples (or packed rows) a loader of `split` iterates over."""
        prepared = (self.splits or {}).get(split)
        if prepared is None:
            return None
        if prepared.rows is None:
            return prepared.examples
        return PackedExamples(prepared.examples, prepared.rows)

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad_to = self.sequence_len if self.pad_to_sequence_len else None
        collate = packed_collate if self.sample_packing else pad_collate
        return collate(items, pad_token_id=self.tokenizer.pad_token_id, pad_to=pad_to)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _sampler(
        self, dataset: TokenizedExamples | PackedExamples, train: bool, world_size: int, rank: int
    ) -> StepBatchSampler:
        return StepBatchSampler(
            dataset.label_counts(),
            # Validation has no optimizer step: one global batch is one micro-batch per rank.
            self.batch_size if train else self.micro_batch_size * world_size,
            self.micro_batch_size,
            shuffle=train,
            seed=self.seed,
            world_size=world_size,
            rank=rank,
            drop_last=train and world_size > 1,
        )

    def train_batches_per_epoch(self, world_size: int | None = None) -> int:
        """Micro-batches one rank trains on in an epoch (after `setup`), without a loader."""
        world = world_size if world_size is not None else self._world()[0]
        return len(self._sampler(self.dataset("train"), True, world, 0))

    def optimizer_steps_per_epoch(self, world_size: int | None = None) -> int:
        """Optimizer steps in an epoch (after `setup`): what a schedule over epochs needs."""
        world = world_size if world_size is not None else self._world()[0]
        return self._sampler(self.dataset("train"), True, world, 0).steps()

    def _loader(self, dataset: TokenizedExamples | PackedExamples, train: bool) -> DataLoader:
        sampler = self._sampler(dataset, train, *self._world())
        loader = ResumableLoader if train else DataLoader
        return loader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            # Its own generator: creating an iterator then never draws on the global RNG that
            # dropout uses, so a resumed run draws the same dropout masks as an unbroken one.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        self._train_loader = self._loader(self.dataset("train"), train=True)
        return self._train_loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called for exactly the batches that are trained on, prefetched ones only when used.
        if self.trainer is not None and self.trainer.training:
            self._train_loader.count_consumed()
        return batch

    def val_dataloader(self) -> DataLoader | list:
        # An empty list tells Lightning there is no validation (val_set_size: 0).
        val = self.dataset("validation")
        return self._loader(val, train=False) if val is not None else []
