"""Alpaca prompt templates: the text a model sees before the answer it learns to write."""

from __future__ import annotations

from collections.abc import Mapping

# The Stanford Alpaca templates, verbatim: models fine-tuned on them (and eval / generate)
# must see byte-identical prompts, so these strings are part of the data's identity.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str | None = None) -> str:  # noqa: A002
    """The prompt for one example; an empty or missing `input` selects the shorter template."""
    if input and input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def format_alpaca(row: Mapping[str, str]) -> tuple[str, str]:
    """Split an alpaca row into (prompt, response) text."""
    return alpaca_prompt(row["instruction"], row.get("input")), row["output"]
