"""The prepared-data cache (`data.dataset_prepared_path`): tokenized and packed splits saved
under a key of everything that decides their content.

The key hashes the rows themselves (so an edited file or a new Hub revision is a new key
without trusting file dates or revision names), the tokenizer's saved files, the prompt
templates, every data setting, and a format version. A change to any of them is a miss and a
rebuild; nothing stale can be served. Entries are written to a temporary folder and renamed
into place, so a run killed mid-write leaves nothing that a later run would load; a complete
entry is never replaced while others may read it; a reader trusts an entry only when it
matches its manifest; and processes preparing the same key take turns, so it is built once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from transformers import PreTrainedTokenizerBase

from lorafit.data import prompts
from lorafit.data.examples import TokenizedExamples
from lorafit.folders import publish, writable_folder

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the saved layout or the tokenization logic changes
MANIFEST = "complete.json"  # written last: the entry's key, and each split's kind and counts


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


def _manifest_entry(split: PreparedSplit) -> dict[str, Any]:
    """What a reader checks before trusting a saved split."""
    return {
        "packed": split.rows is not None,
        "examples": len(split.examples),
        "tokens": int(len(split.examples.input_ids)),
        "rows": None if split.rows is None else len(split.rows),
    }


def _save_split(split: PreparedSplit, folder: Path) -> None:
    split.examples.save(folder)
    if split.rows is not None:
        lengths = np.array([len(r) for r in split.rows], dtype=np.int64)
        np.save(folder / "row_lengths.npy", lengths)
        np.save(folder / "row_members.npy", np.array([i for r in split.rows for i in r], np.int64))


def _load_split(folder: Path, expected: Mapping[str, Any]) -> PreparedSplit:
    examples = TokenizedExamples.load(folder)
    rows = None
    if expected["packed"]:
        lengths, members = np.load(folder / "row_lengths.npy"), np.load(folder / "row_members.npy")
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        rows = [members[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    split = PreparedSplit(examples, rows)
    found = _manifest_entry(split)
    if found != dict(expected):
        raise ValueError(f"{folder} holds {found}, its manifest says {dict(expected)}")
    return split


def _manifest(folder: Path, key: str) -> dict[str, Any] | None:
    """The entry's manifest when it is complete and belongs to `key`, else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key or manifest.get("format") != FORMAT_VERSION:
        return None
    return manifest


def load(root: Path, key: str) -> dict[str, PreparedSplit] | None:
    """The cached splits under `key`, or None on a miss.

    The manifest names the key, and for each split whether it is packed and how many examples,
    tokens and rows it holds; an entry that does not match it is not trusted (a miss).
    """
    folder = Path(root) / key
    manifest = _manifest(folder, key)
    if manifest is None:
        return None
    try:
        splits = {
            name: _load_split(folder / name, expected)
            for name, expected in manifest["splits"].items()
        }
    except (OSError, ValueError) as error:
        log.warning("prepared data: ignoring the damaged entry %s (%s)", folder, error)
        return None
    log.info("prepared data: loaded %s", folder)
    return splits


def save(root: Path, key: str, splits: Mapping[str, PreparedSplit]) -> Path:
    """Write the splits under `key` atomically; an existing complete entry is left alone."""

    def build(folder: Path) -> None:
        for name, split in splits.items():
            _save_split(split, folder / name)
        # Written last: a folder without it is never trusted.
        manifest = {
            "key": key,
            "format": FORMAT_VERSION,
            "splits": {name: _manifest_entry(split) for name, split in splits.items()},
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))

    target = publish(Path(root) / key, build, lambda p: _manifest(p, key) is not None)
    log.info("prepared data: saved %s", target)
    return target


def load_or_build(
    root: Path, key: str, build: Callable[[], dict[str, PreparedSplit]]
) -> tuple[dict[str, PreparedSplit], bool]:
    """The splits under `key`, built and saved by `build()` when missing.

    Processes preparing the same key at once (sweep trials, several train.py) take turns on a
    lock per key: the first builds, the others wait and then load its entry, so the data is
    tokenized once. Returns the splits and whether they came from the cache.
    """
    root = Path(root)
    splits = load(root, key)
    if splits is not None:
        return splits, True
    writable_folder("data.dataset_prepared_path", root / ".locks")
    with FileLock(root / ".locks" / f"{key}.lock"):
        splits = load(root, key)  # built by whoever held the lock before us
        if splits is not None:
            return splits, True
        splits = build()
        save(root, key, splits)
    return splits, False
