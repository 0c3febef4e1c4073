"""Turn prompt / response text into token ids and labels, the prompt masked from the loss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from lorafit.constants import IGNORE_INDEX
from lorafit.data.prompts import format_alpaca


@dataclass
class TokenizeStats:
    """What tokenization dropped or shortened, for the log."""

    examples: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0
    dropped_overlong: int = 0


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# What happens to an example longer than sequence_len.
OVERLONG_POLICIES = ("truncate", "drop")


def tokenize_alpaca(
    rows: Sequence[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    sequence_len: int,
    train_on_inputs: bool = False,
    overlong: str = "truncate",
) -> tuple[list[dict[str, list[int]]], TokenizeStats]:
    """Tokenize alpaca rows into `input_ids` and `labels`, EOS appended.

    The whole prompt + response is tokenized in one piece, so the response tokens are the ones
    the model sees at inference after the same prompt. Labels copy the ids except over the
    prompt (unless `train_on_inputs`), where they are IGNORE_INDEX. Examples longer than
    `sequence_len` are cut at the end (`overlong="truncate"`) or left out (`"drop"`); one whose
    response is cut away entirely is dropped. (`overlong` is one of OVERLONG_POLICIES, which
    the config checks hold it to.)
    """
    prompts, responses = zip(*(format_alpaca(row) for row in rows), strict=True)
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    full_ids = tokenizer(
        [p + r for p, r in zip(prompts, responses, strict=True)], add_special_tokens=True
    )["input_ids"]
    stats = TokenizeStats()
    examples = []
    for prompt, full in zip(prompt_ids, full_ids, strict=True):
        ids = [*full, tokenizer.eos_token_id]
        # If a token merged across the prompt/response boundary it counts as prompt.
        n_prompt = _common_prefix(prompt, full)
        labels = ids.copy() if train_on_inputs else [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        if len(ids) > sequence_len:
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            ids, labels = ids[:sequence_len], labels[:sequence_len]
            stats.truncated += 1
        # The first position never has a target: logits at t predict the label at t + 1.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            stats.dropped_no_labels += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    stats.examples = len(examples)
    return examples, stats
