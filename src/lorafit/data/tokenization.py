"""Turn rows into token ids and labels: for alpaca and chat rows the prompt is masked from the
loss, for completion rows every token is learned."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from lorafit.constants import IGNORE_INDEX
from lorafit.data.chat import ChatTemplate, Messages
from lorafit.data.prompts import format_alpaca
from lorafit.data.rows import row_type
from lorafit.errors import DataError

Example = dict[str, list[int]]


@dataclass
class TokenizeStats:
    """What tokenization dropped, shortened or split, for the log."""

    examples: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0
    dropped_overlong: int = 0
    split_documents: int = 0  # completion documents continued over several examples


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# What happens to an example longer than sequence_len. `split` continues a completion
# document in the next example (as pretraining does); an alpaca or chat example, whose reply
# means nothing without its prompt, is cut at the end as with `truncate`.
OVERLONG_POLICIES = ("truncate", "drop", "split")


def _alpaca_examples(
    rows: Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool
) -> list[Example]:
    """The whole prompt + response is tokenized in one piece, so the response tokens are the
    ones the model sees at inference after the same prompt; EOS ends it."""
    prompts, responses = zip(*(format_alpaca(row) for row in rows), strict=True)
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    full_ids = tokenizer(
        [p + r for p, r in zip(prompts, responses, strict=True)], add_special_tokens=True
    )["input_ids"]
    examples = []
    for prompt, full in zip(prompt_ids, full_ids, strict=True):
        ids = [*full, tokenizer.eos_token_id]
        # If a token merged across the prompt/response boundary it counts as prompt.
        n_prompt = _common_prefix(prompt, full)
        labels = ids.copy() if train_on_inputs else [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def _completion_examples(
    rows: Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase
) -> list[Example]:
    """Each document as the tokenizer reads plain text (BOS where it adds one), EOS appended,
    every token learned."""
    ids_of = tokenizer([row["text"] for row in rows], add_special_tokens=True)["input_ids"]
    return [
        {"input_ids": [*ids, tokenizer.eos_token_id], "labels": [*ids, tokenizer.eos_token_id]}
        for ids in ids_of
    ]


def tokenize_conversation(
    template: ChatTemplate, messages: Messages, train_on_inputs: bool, where: str
) -> dict[str, list[int]]:
    """`input_ids` of the rendered conversation; `labels` keep only the assistant turns
    (each reply and the template's end-of-turn after it), or everything with
    `train_on_inputs`. A turn that cannot be located is a DataError naming `where`."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    full = template.render(messages)
    texts = [full]
    for i in turns:
        texts += [template.prompt(messages[:i]), template.render(messages[: i + 1])]
    for n, text in enumerate(texts[1:]):
        if not full.startswith(text):
            raise DataError(
                f"{where}: the chat template renders the conversation differently from its "
                f"first turns, so assistant message {turns[n // 2]} cannot be located"
            )
    full_ids, *parts = template.encode(texts)
    if train_on_inputs:
        return {"input_ids": full_ids, "labels": list(full_ids)}
    labels = [IGNORE_INDEX] * len(full_ids)
    for n, turn in enumerate(turns):
        prompt_ids, through_ids = parts[2 * n], parts[2 * n + 1]
        # A token merged across the prompt / reply boundary counts as prompt, as for alpaca.
        start = _common_prefix(prompt_ids, full_ids)
        end = _common_prefix(through_ids, full_ids)
        if end <= start:
            raise DataError(f"{where}: assistant message {turn} renders to no token")
        labels[start:end] = full_ids[start:end]
    if all(label != IGNORE_INDEX for label in labels[1:]):
        raise DataError(
            f"{where}: the chat template leaves nothing but assistant text, so nothing would "
            "be masked; use a template with role markers"
        )
    return {"input_ids": full_ids, "labels": labels}


def split_document(ids: Sequence[int], sequence_len: int) -> list[list[int]]:
    """A document in pieces of at most `sequence_len` tokens that overlap by one token: a
    piece's first token is only context (it has no target), so starting it on the previous
    piece's last token makes every token after the document's first a target exactly once."""
    if len(ids) <= sequence_len:
        return [list(ids)]
    stride = sequence_len - 1
    return [list(ids[start : start + sequence_len]) for start in range(0, len(ids) - 1, stride)]


def _keep(example: Example, sequence_len: int, overlong: str, stats: TokenizeStats) -> list:
    """The example as trained on: cut or dropped by `overlong`, dropped if nothing is learned."""
    if len(example["input_ids"]) > sequence_len:
        if overlong == "drop":
            stats.dropped_overlong += 1
            return []
        example = {key: value[:sequence_len] for key, value in example.items()}
        stats.truncated += 1
    # The first position never has a target: logits at t predict the label at t + 1.
    if all(label == IGNORE_INDEX for label in example["labels"][1:]):
        stats.dropped_no_labels += 1
        return []
    return [example]


def tokenize_rows(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    sequence_len: int,
    train_on_inputs: bool = False,
    overlong: str = "truncate",
    chat_template: ChatTemplate | None = None,
    split: str = "train",
) -> tuple[list[Example], TokenizeStats]:
    """Tokenize rows of any shape (lorafit.data.rows) into `input_ids` and `labels`.

    alpaca: the prompt is masked (unless `train_on_inputs`), EOS ends the response. chat: the
    conversation rendered with `chat_template`, only assistant turns learned (unless
    `train_on_inputs`). completion: every token learned. Examples longer than `sequence_len`
    follow `overlong` (OVERLONG_POLICIES, which the config checks hold it to); one left with
    nothing to learn is dropped. The output keeps the rows' order, and a split document's
    pieces stay together in order. `split` names the rows in errors.
    """
    positions: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        positions.setdefault(row_type(row), []).append(index)
    whole: list[Example | None] = [None] * len(rows)
    for kind, indices in positions.items():
        chosen = [rows[i] for i in indices]
        if kind == "alpaca":
            made = _alpaca_examples(chosen, tokenizer, train_on_inputs)
        elif kind == "completion":
            made = _completion_examples(chosen, tokenizer)
        else:
            if chat_template is None:
                raise ValueError("chat rows need a chat template")
            made = [
                tokenize_conversation(
                    chat_template, row["messages"], train_on_inputs, f"{split} row {i}"
                )
                for i, row in zip(indices, chosen, strict=True)
            ]
        for index, example in zip(indices, made, strict=True):
            whole[index] = example
    stats = TokenizeStats()
    examples: list[Example] = []
    for row, example in zip(rows, whole, strict=True):
        if overlong == "split" and row_type(row) == "completion":
            pieces = split_document(example["input_ids"], sequence_len)
            stats.split_documents += len(pieces) > 1
            for piece in pieces:
                examples += _keep({"input_ids": piece, "labels": piece}, sequence_len, "", stats)
        else:
            examples += _keep(example, sequence_len, overlong, stats)
    stats.examples = len(examples)
    return examples, stats


def tokenize_alpaca(
    rows: Sequence[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    sequence_len: int,
    train_on_inputs: bool = False,
    overlong: str = "truncate",
) -> tuple[list[Example], TokenizeStats]:
    """Alpaca rows alone (see `tokenize_rows`)."""
    return tokenize_rows(rows, tokenizer, sequence_len, train_on_inputs, overlong)
