"""The prepared-data cache (`data.dataset_prepared_path`): tokenized and packed splits saved
under a key of everything that decides their content.

The key hashes the rows themselves (so an edited file or a new Hub revision is a new key
without trusting file dates or revision names), the tokenizer's saved files, the prompt
templates, every data setting, and a format version. A change to any of them is a miss and a
rebuild; nothing stale can be served. Entries are written to a temporary folder and renamed
into place, so a run killed mid-write leaves nothing that a later run would load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from lorafit import prompts
from lorafit.atomic_folder import publish
from lorafit.examples import TokenizedExamples

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the saved layout or the tokenization logic changes


@dataclass
class PreparedSplit:
    """One split, tokenized, with its packing plan (None when not packed)."""

    examples: TokenizedExamples
    rows: list[list[int]] | None


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the files the tokenizer saves: vocabulary, merges, special tokens, settings."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        for path in sorted(Path(folder).iterdir()):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(
    rows: Sequence[Sequence[Mapping[str, str]]],
    tokenizer: PreTrainedTokenizerBase,
    settings: Mapping[str, Any],
) -> str:
    """The key of the prepared data for these splits' rows, tokenizer and data settings."""
    digest = hashlib.sha256()
    material = {
        "format": FORMAT_VERSION,
        "templates": [prompts.ALPACA_WITH_INPUT, prompts.ALPACA_NO_INPUT],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": dict(sorted(settings.items())),
    }
    digest.update(json.dumps(material, sort_keys=True, default=str).encode())
    for split in rows:
        digest.update(b"\x00split")
        for row in split:
            digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()[:32]


def _save_split(split: PreparedSplit, folder: Path) -> None:
    split.examples.save(folder)
    if split.rows is not None:
        lengths = np.array([len(r) for r in split.rows], dtype=np.int64)
        np.save(folder / "row_lengths.npy", lengths)
        np.save(folder / "row_members.npy", np.array([i for r in split.rows for i in r], np.int64))


def _load_split(folder: Path) -> PreparedSplit:
    examples = TokenizedExamples.load(folder)
    if not (folder / "row_lengths.npy").is_file():
        return PreparedSplit(examples, None)
    lengths, members = np.load(folder / "row_lengths.npy"), np.load(folder / "row_members.npy")
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    rows = [members[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return PreparedSplit(examples, rows)


def load(root: Path, key: str) -> dict[str, PreparedSplit] | None:
    """The cached splits under `key`, or None on a miss."""
    folder = Path(root) / key
    if not (folder / "complete.json").is_file():
        return None
    splits = json.loads((folder / "complete.json").read_text())["splits"]
    log.info("prepared data: loaded %s", folder)
    return {name: _load_split(folder / name) for name in splits}


def save(root: Path, key: str, splits: Mapping[str, PreparedSplit]) -> Path:
    """Write the splits under `key` atomically; an existing complete entry is left alone."""

    def build(folder: Path) -> None:
        for name, split in splits.items():
            _save_split(split, folder / name)
        # Written last: a folder without it is never trusted.
        (folder / "complete.json").write_text(json.dumps({"splits": list(splits)}))

    target = publish(Path(root) / key, build, lambda p: (p / "complete.json").is_file())
    log.info("prepared data: saved %s", target)
    return target
