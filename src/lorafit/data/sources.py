"""Load alpaca-format rows from the embedded demo set, local files or the Hub, and check them.

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

from lorafit.errors import DataError

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
ALPACA_FIELDS = ("instruction", "input", "output")


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


def _load_hub(path: str, revision: str | None, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(path, revision=revision, split=split)
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
    return _load_hub(path, source.get("revision"), source.get("split", "train")), path


def check_alpaca_rows(rows: datasets.Dataset, name: str) -> None:
    """Raise a `DataError` naming the first row whose fields are missing or of the wrong type."""
    if len(rows) == 0:
        raise DataError(f"{name}: the data set is empty")
    for field in ("instruction", "output"):
        if field not in rows.column_names:
            raise DataError(
                f"{name}: no row has the field {field!r} (fields found: "
                f"{', '.join(rows.column_names)}); alpaca rows need instruction and output"
            )
    inputs = rows["input"] if "input" in rows.column_names else [None] * len(rows)
    for index, (instruction, input_, output) in enumerate(
        zip(rows["instruction"], inputs, rows["output"], strict=True)
    ):
        for field, value, required in (
            ("instruction", instruction, True),
            ("output", output, True),
            ("input", input_, False),
        ):
            if value is None and required:
                raise DataError(f"{name}: row {index} has no {field!r}")
            if value is not None and not isinstance(value, str):
                raise DataError(
                    f"{name}: row {index} field {field!r} is {type(value).__name__}, not text"
                )
        if not instruction.strip():
            raise DataError(f"{name}: row {index} has an empty 'instruction'")
    empty = [i for i, output in enumerate(rows["output"]) if not output.strip()]
    if empty:
        # Kept (some data sets mean "no answer"), but such a row teaches only the EOS token.
        log.warning(
            "%s: %d row(s) have an empty 'output' (rows %s%s) and train on the end-of-sequence "
            "token alone",
            name,
            len(empty),
            ", ".join(map(str, empty[:5])),
            ", ..." if len(empty) > 5 else "",
        )


def load_alpaca(sources: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Load, check and concatenate every source into plain {instruction, input, output} rows."""
    if not sources:
        raise DataError("data.datasets is empty: name at least one data set")
    rows: list[dict[str, str]] = []
    for source in sources:
        kind = source.get("type", "alpaca")
        if kind != "alpaca":
            raise DataError(f"data set {source.get('path')!r}: unknown type {kind!r}")
        loaded, name = load_source(source)
        check_alpaca_rows(loaded, name)
        inputs = loaded["input"] if "input" in loaded.column_names else [""] * len(loaded)
        rows.extend(
            {"instruction": i, "input": x or "", "output": o}
            for i, x, o in zip(loaded["instruction"], inputs, loaded["output"], strict=True)
        )
    return rows
