"""Tokenized examples held as flat arrays, and packed rows built from them on demand.

Flat int32 arrays with offsets keep a large data set small in memory, save and load as plain
.npy files (the prepared-data cache), and slice in constant time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from lorafit.constants import IGNORE_INDEX
from lorafit.data.batching import StepItem
from lorafit.data.packing import pack_row


class TokenizedExamples(Dataset):
    """Examples as `input_ids` / `labels` slices of two flat arrays, indexed by `StepItem`s."""

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray):
        self.input_ids, self.labels, self.offsets = input_ids, labels, offsets

    @classmethod
    def from_lists(cls, examples: Sequence[dict[str, list[int]]]) -> TokenizedExamples:
        lengths = [len(e["input_ids"]) for e in examples]
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = [t for e in examples for t in e["input_ids"]]
        flat_labels = [t for e in examples for t in e["labels"]]
        return cls(np.array(flat, np.int32), np.array(flat_labels, np.int32), offsets)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("input_ids", "labels", "offsets"):
            np.save(folder / f"{name}.npy", getattr(self, name))

    @classmethod
    def load(cls, folder: Path) -> TokenizedExamples:
        return cls(*(np.load(folder / f"{n}.npy") for n in ("input_ids", "labels", "offsets")))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, index: int) -> dict[str, list[int]]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return {
            "input_ids": self.input_ids[start:end].tolist(),
            "labels": self.labels[start:end].tolist(),
        }

    def label_counts(self) -> list[int]:
        """Label tokens per example (as `label_tokens`), vectorised over the flat arrays."""
        if len(self) == 0:
            return []
        learned = (self.labels != IGNORE_INDEX).astype(np.int64)
        starts = self.offsets[:-1]
        # An example's first label is never a target (logits at t predict label t + 1).
        return (np.add.reduceat(learned, starts) - learned[starts]).tolist()

    def __getitem__(self, key: int | StepItem) -> dict[str, list[int] | int]:
        index, step_tokens = key if isinstance(key, tuple) else (key, 0)
        return {**self.example(index), "step_tokens": step_tokens}


class PackedExamples(Dataset):
    """Rows of several examples each (see lorafit.data.packing), concatenated when fetched."""

    def __init__(self, examples: TokenizedExamples, rows: Sequence[Sequence[int]]):
        self.examples = examples
        self.rows = [list(row) for row in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def label_counts(self) -> list[int]:
        per_example = self.examples.label_counts()
        return [sum(per_example[i] for i in row) for row in self.rows]

    def __getitem__(self, key: int | StepItem) -> dict[str, list[int] | int]:
        index, step_tokens = key if isinstance(key, tuple) else (key, 0)
        row = pack_row([self.examples.example(i) for i in self.rows[index]])
        return {**row, "step_tokens": step_tokens}
