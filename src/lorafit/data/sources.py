"""Load rows from the embedded demo sets, local files (JSON, JSON Lines, parquet, CSV) or the
Hub, and check them (lorafit.data.rows).

Every problem is a `DataError` that names the source, the row and the field, raised before
any model is loaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import datasets

from lorafit.data.rows import check_source_settings, normalize
from lorafit.errors import DataError

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def builtin_path(name: str) -> Path:
    """The file of a data set shipped inside the package (`builtin:demo_alpaca`)."""
    path = Path(str(resources.files("lorafit") / "assets" / f"{name}.json"))
    if not path.is_file():
        shipped = sorted(p.stem for p in path.parent.glob("*.json"))
        raise DataError(f"no built-in data set {name!r}; available: {', '.join(shipped)}")
    return path


def _load_local(path: Path) -> datasets.Dataset:
    builder = LOCAL_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; use one of "
            f"{', '.join(sorted(LOCAL_FORMATS))}"
        )
    if path.read_bytes()[:4096].strip() in (b"", b"[]"):
        raise DataError(f"{path}: the data set is empty")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # noqa: BLE001 - any parser failure becomes one clear message
        where = _json_syntax_error(path) if builder == "json" else None
        reason = where or " ".join((str(error) or type(error).__name__).split())
        raise DataError(f"{path}: could not be read as {builder}: {reason}") from error


def _json_syntax_error(path: Path) -> str | None:
    """Where a JSON or JSON Lines file stops parsing, as `line L column C: reason`."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                return f"line {number} column {error.colno}: {error.msg}"
        return None
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        return f"line {error.lineno} column {error.colno}: {error.msg}"
    return None


def _load_hub(
    path: str, revision: str | None, split: str, name: str | None = None
) -> datasets.Dataset:
    try:
        return datasets.load_dataset(path, name, revision=revision, split=split)
    except Exception as error:  # noqa: BLE001 - network, auth and naming errors alike
        raise DataError(
            f"could not load Hub data set {path!r} (revision {revision or 'default'}, split "
            f"{split!r}): {error}. The Hub needs network access; offline, use data=demo or "
            "data=local with data.datasets.0.path=<file>."
        ) from error


def _looks_local(path: str) -> bool:
    # A Hub id is "owner/name"; anything with a file suffix or a leading ./ ~ / is a file.
    return Path(path).suffix.lower() in LOCAL_FORMATS or path.startswith((".", "/", "~"))


def load_source(source: Mapping[str, Any]) -> tuple[datasets.Dataset, str]:
    """Load one entry of `data.datasets`; returns the rows and a name for messages."""
    path = str(source["path"])
    if path.startswith(BUILTIN_PREFIX):
        local = builtin_path(path.removeprefix(BUILTIN_PREFIX))
        return _load_local(local), str(local)
    if _looks_local(path):
        local = Path(path).expanduser()
        if not local.is_file():
            raise DataError(f"data file not found: {local.resolve()} (from data.datasets path)")
        return _load_local(local), str(local)
    hub = _load_hub(path, source.get("revision"), source.get("split", "train"), source.get("name"))
    return hub, path


def load_tagged(sources: Sequence[Mapping[str, Any]]) -> tuple[list[dict], list[int]]:
    """Load, check and concatenate every source into plain rows (lorafit.data.rows), with the
    index of the source each row came from (for the mixing weights)."""
    check_source_settings(sources)
    rows: list[dict] = []
    owners: list[int] = []
    for index, source in enumerate(sources):
        loaded, name = load_source(source)
        plain = normalize(loaded, name, source)
        rows += plain
        owners += [index] * len(plain)
    return rows, owners


def load_rows(sources: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Every source's rows, checked, in their plain form, one source after the other."""
    return load_tagged(sources)[0]
