"""The three row shapes lorafit trains on, checked and brought to one plain form each.

    alpaca      {instruction, input, output}        instruction tuning, the answer is learned
    completion  {text}                              raw text, every token is learned
    chat        {messages: [{role, content}, ...]}  conversations, the assistant turns are learned

A source's `type` says which shape its rows have. Every problem is a `DataError` naming the
source, the row and the field, raised before any model is loaded.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets

from lorafit.errors import DataError

log = logging.getLogger(__name__)

ROW_TYPES = ("alpaca", "completion", "chat")
# Keys a `data.datasets` entry may have: where the rows are, their shape, and their share.
SOURCE_KEYS = (
    "path", "type", "revision", "split", "name", "weight", "text_field", "field_messages",
)  # fmt: skip
CHAT_ROLES = ("system", "user", "assistant")
# The ShareGPT spelling of the roles, read as the chat-template ones.
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}
# Message key pairs understood: (role key, content key).
MESSAGE_KEYS = (("role", "content"), ("from", "value"))


def row_type(row: Mapping[str, Any]) -> str:
    """The shape of a plain row (as `normalize` returns it)."""
    if "messages" in row:
        return "chat"
    if "text" in row:
        return "completion"
    return "alpaca"


def check_source_settings(sources: Sequence[Mapping[str, Any]]) -> None:
    """The `data.datasets` entries themselves, before anything is loaded."""
    if not sources:
        raise DataError("data.datasets is empty: name at least one data set")
    weighted = [i for i, s in enumerate(sources) if s.get("weight") is not None]
    for index, source in enumerate(sources):
        where = f"data.datasets.{index}"
        if not isinstance(source, Mapping):
            raise DataError(f"{where}: expected a mapping with a path, got {source!r}")
        for key in source:
            if key not in SOURCE_KEYS:
                near = difflib.get_close_matches(str(key), SOURCE_KEYS, n=1, cutoff=0.6)
                hint = f"; did you mean {near[0]}?" if near else ""
                raise DataError(
                    f"{where}.{key}: unknown key{hint} (known: {', '.join(SOURCE_KEYS)})"
                )
        if not isinstance(source.get("path"), str) or not source["path"]:
            raise DataError(f"{where}.path: name a file, a Hub data set or builtin:<name>")
        kind = source.get("type", "alpaca")
        if kind not in ROW_TYPES:
            raise DataError(f"{where}.type={kind!r}: expected one of {', '.join(ROW_TYPES)}")
        weight = source.get("weight")
        if weight is not None and (
            isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0
        ):
            raise DataError(f"{where}.weight={weight!r}: expected a number > 0")
        for key in ("text_field", "field_messages"):
            if source.get(key) is not None and not isinstance(source[key], str):
                raise DataError(f"{where}.{key}={source[key]!r}: expected a column name")
    if weighted and len(weighted) != len(sources):
        unweighted = next(i for i in range(len(sources)) if i not in weighted)
        raise DataError(
            f"data.datasets.{unweighted}.weight is missing: weights are shares of the mixture, "
            "so give every source one (or none)"
        )


def _column(rows: datasets.Dataset, name: str, field: str, needed_for: str) -> list[Any]:
    if field not in rows.column_names:
        raise DataError(
            f"{name}: no row has the field {field!r} (fields found: "
            f"{', '.join(rows.column_names)}); {needed_for}"
        )
    return rows[field]


def alpaca_rows(rows: datasets.Dataset, name: str, source: Mapping[str, Any]) -> list[dict]:
    """{instruction, input, output} rows; a missing or non-text field names its row."""
    needed = "alpaca rows need instruction and output"
    instructions = _column(rows, name, "instruction", needed)
    outputs = _column(rows, name, "output", needed)
    inputs = rows["input"] if "input" in rows.column_names else [None] * len(rows)
    for index, (instruction, input_, output) in enumerate(
        zip(instructions, inputs, outputs, strict=True)
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
    empty = [i for i, output in enumerate(outputs) if not output.strip()]
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
    return [
        {"instruction": i, "input": x or "", "output": o}
        for i, x, o in zip(instructions, inputs, outputs, strict=True)
    ]


def completion_rows(rows: datasets.Dataset, name: str, source: Mapping[str, Any]) -> list[dict]:
    """{text} rows from the source's `text_field` (default `text`); empty text names its row."""
    field = source.get("text_field") or "text"
    texts = _column(rows, name, field, "set data.datasets.<i>.text_field to the text column")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            kind = "no" if text is None else type(text).__name__
            raise DataError(f"{name}: row {index} field {field!r} is {kind} text")
        if not text.strip():
            raise DataError(f"{name}: row {index} has an empty {field!r}")
    return [{"text": text} for text in texts]


def _message(message: Any, name: str, where: str) -> dict[str, str]:
    if not isinstance(message, Mapping):
        raise DataError(f"{name}: {where} is {type(message).__name__}, not a message mapping")
    pair = next(((r, c) for r, c in MESSAGE_KEYS if r in message and c in message), None)
    if pair is None:
        raise DataError(
            f"{name}: {where} has keys {sorted(message)}; a message needs role and content "
            "(or from and value)"
        )
    role, content = message[pair[0]], message[pair[1]]
    role = ROLE_ALIASES.get(role, role)
    if role not in CHAT_ROLES:
        raise DataError(
            f"{name}: {where} has the unknown role {message[pair[0]]!r} (known: "
            f"{', '.join(CHAT_ROLES)}; human and gpt are read as user and assistant)"
        )
    if not isinstance(content, str) or not content.strip():
        found = "empty" if isinstance(content, str) else type(content).__name__
        raise DataError(f"{name}: {where} ({role}) has {found} content, not text")
    return {"role": role, "content": content}


def chat_rows(rows: datasets.Dataset, name: str, source: Mapping[str, Any]) -> list[dict]:
    """{messages} rows: role/content or from/value messages, with at least one assistant turn."""
    field = source.get("field_messages")
    if field is None:
        # The chat-template convention, then ShareGPT's.
        field = next((f for f in ("messages", "conversations") if f in rows.column_names), None)
    conversations = _column(
        rows, name, field or "messages", "set data.datasets.<i>.field_messages to the column"
    )
    out = []
    for index, conversation in enumerate(conversations):
        if not isinstance(conversation, list) or not conversation:
            found = "empty" if conversation == [] else type(conversation).__name__
            raise DataError(f"{name}: row {index} has {found} messages, not a list of messages")
        messages = [
            _message(m, name, f"row {index} message {i}") for i, m in enumerate(conversation)
        ]
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{name}: row {index} has no assistant message to learn from")
        out.append({"messages": messages})
    return out


NORMALIZE: dict[str, Callable[[datasets.Dataset, str, Mapping[str, Any]], list[dict]]] = {
    "alpaca": alpaca_rows,
    "completion": completion_rows,
    "chat": chat_rows,
}


def normalize(rows: datasets.Dataset, name: str, source: Mapping[str, Any]) -> list[dict]:
    """The source's rows in their plain form; raises DataError naming the first bad row."""
    if len(rows) == 0:
        raise DataError(f"{name}: the data set is empty")
    return NORMALIZE[source.get("type", "alpaca")](rows, name, source)
