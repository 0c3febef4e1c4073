"""The LightningDataModule: load -> check -> split -> mix -> tokenize -> pack -> loaders.

The data logic itself lives in pure functions (sources, rows, mixing, chat, tokenization,
packing, batching); this class only orchestrates them and hands Lightning its loaders.
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

from lorafit.data import chat, prepared_cache
from lorafit.data.batching import ResumableLoader, StepBatchSampler, pad_collate
from lorafit.data.examples import PackedExamples, TokenizedExamples
from lorafit.data.mixing import mix
from lorafit.data.packing import pack_rows, packed_collate
from lorafit.data.prepared_cache import PreparedSplit
from lorafit.data.prompter import Prompter
from lorafit.data.sources import load_tagged
from lorafit.data.tokenization import tokenize_rows
from lorafit.errors import DataError

log = logging.getLogger(__name__)


def split_indices(count: int, val_set_size: float | int, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train / validation split of `count` rows, as sorted index lists.

    `val_set_size` below 1 is a fraction (rounded up, as `datasets.train_test_split` does), a
    whole number from 1 up is a count of rows, 0 means no validation. The same rows and seed
    always give the same split. The value's range is checked with the rest of the config
    (lorafit.config_checks); what is checked here is what only the rows can tell.
    """
    n_val = math.ceil(count * val_set_size) if val_set_size < 1 else int(val_set_size)
    if n_val >= count:
        raise DataError(f"data.val_set_size={val_set_size} leaves no training rows out of {count}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def split_rows(
    rows: Sequence[dict[str, Any]], val_set_size: float | int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of `split_indices`: (train, validation)."""
    train, val = split_indices(len(rows), val_set_size, seed)
    return [rows[i] for i in train], [rows[i] for i in val]


class FineTuneDataModule(pl.LightningDataModule):
    """Instruction (alpaca), raw-text (completion) and conversation (chat) data for causal-LM
    fine-tuning, from one or several sources.

    Args:
        datasets: Sources, each `{path, type, revision?, split?, name?, weight?, text_field?,
            field_messages?}` (lorafit.data.rows.SOURCE_KEYS); `path` is a Hub id, a local
            .json / .jsonl / .parquet / .csv file, or `builtin:<name>`; `type` is alpaca,
            completion or chat; `weight` is the source's share of the training rows.
        sequence_len: Longest example (or packed row) in tokens.
        val_set_size: Validation share (fraction) or row count; 0 for none.
        train_on_inputs: Also learn the prompt tokens (off: only the response, or the
            assistant turns, are learned).
        batch_size: Examples (packed: rows) per optimizer step over all devices.
        micro_batch_size: Examples (packed: rows) per forward pass on one device.
        sample_packing: Pack several examples into each row of `sequence_len` tokens.
        pad_to_sequence_len: Pad every batch to exactly `sequence_len` (static shapes).
        overlong: Examples longer than `sequence_len`: "truncate" (cut the end), "drop", or
            "split" (a completion document continues in the next example).
        chat_template: For chat rows: "tokenizer_default", "chatml" or a Jinja template.
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
        chat_template: str = chat.TOKENIZER_DEFAULT,
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
        self.chat_template_setting = chat_template
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.chat_template: chat.ChatTemplate | None = None
        self.rows: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None
        self.splits: dict[str, PreparedSplit] | None = None
        self.prepared_from_cache = False
        self.cache_key: str | None = None

    @property
    def row_types(self) -> set[str]:
        return {source.get("type", "alpaca") for source in self.sources}

    def connect(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Hand over the model's tokenizer: the one thing the data needs from the model side.
        Chat data's template is checked here, before any row is tokenized."""
        self.tokenizer = tokenizer
        if "chat" in self.row_types:
            self.chat_template = chat.resolve(tokenizer, self.chat_template_setting)

    def load_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Load, check, split and mix the rows (once); raises DataError on bad data."""
        if self.rows is None:
            rows, owners = load_tagged(self.sources)
            train, val = split_indices(len(rows), self.val_set_size, self.seed)
            weights = [source.get("weight") for source in self.sources]
            if weights[0] is not None:
                train = mix(train, owners, weights, self.seed)
                counts = [sum(owners[i] == s for i in train) for s in range(len(weights))]
                log.info("mixed training rows by weight: %s per source", counts)
            self.rows = [rows[i] for i in train], [rows[i] for i in val]
        return self.rows

    def prompter(self) -> Prompter:
        """Prompts for generation, tokenized as this data's rows were (after `connect`)."""
        types = self.row_types
        style = "chat" if "chat" in types else "alpaca" if "alpaca" in types else "completion"
        return Prompter(self.tokenizer, style, self.chat_template)

    def settings(self) -> dict[str, Any]:
        """Every setting that changes the prepared data (the cache key includes them all)."""
        return {
            "sequence_len": self.sequence_len,
            "val_set_size": self.val_set_size,
            "train_on_inputs": self.train_on_inputs,
            "sample_packing": self.sample_packing,
            "overlong": self.overlong,
            "seed": self.seed,
            # The rows are hashed too; these say how they were read and mixed.
            "sources": [
                {key: source.get(key) for key in ("type", "weight", "text_field", "field_messages")}
                for source in self.sources
            ],
            "chat_template": self.chat_template.source if self.chat_template else None,
        }

    def _prepare(self, rows: list[dict[str, Any]], split: str) -> PreparedSplit:
        examples, stats = tokenize_rows(
            rows,
            self.tokenizer,
            self.sequence_len,
            self.train_on_inputs,
            self.overlong,
            self.chat_template,
            split,
        )
        if stats.split_documents:
            log.info(
                "%s: %d documents longer than sequence_len=%d continue over several rows",
                split,
                stats.split_documents,
                self.sequence_len,
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
            raise RuntimeError("call the data module's connect(tokenizer) before setup()")
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
        # The real tokens read while the batch is still on the host: read from the device,
        # the count would make the host wait for the GPU at every micro-batch.
        if isinstance(batch, dict) and isinstance(batch.get("real_tokens"), torch.Tensor):
            batch["real_tokens"] = int(batch["real_tokens"])
        return batch

    def val_dataloader(self) -> DataLoader | list:
        # An empty list tells Lightning there is no validation (val_set_size: 0).
        val = self.dataset("validation")
        return self._loader(val, train=False) if val is not None else []


# The class's earlier name, which run configs written before it changed still name.
AlpacaDataModule = FineTuneDataModule
