"""Prompt strings, tokenization, label masking and EOS, on the real Mistral-7B tokenizer."""

from __future__ import annotations

import pytest

from lorafit.constants import IGNORE_INDEX
from lorafit.data.prompts import alpaca_prompt
from lorafit.data.tokenization import tokenize_alpaca
from lorafit.model.sources import mistral_tokenizer

WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:\n"
)
WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nName a primary colour.\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def tokenizer():
    return mistral_tokenizer()


def test_prompt_with_input_is_exact():
    assert alpaca_prompt("Translate to French.", "Good morning") == WITH_INPUT


@pytest.mark.parametrize("empty", ["", None, "   "])
def test_prompt_without_input_is_exact(empty):
    assert alpaca_prompt("Name a primary colour.", empty) == WITHOUT_INPUT


def test_mistral_tokenizer_is_the_real_one(tokenizer):
    assert len(tokenizer) == 32000
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer("Below is an instruction").input_ids == [1, 20811, 349, 396, 13126]
    assert tokenizer.pad_token_id is not None


@pytest.mark.parametrize(
    ("row", "prompt"),
    [
        (
            {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
            WITH_INPUT,
        ),
        ({"instruction": "Name a primary colour.", "input": "", "output": "Red"}, WITHOUT_INPUT),
    ],
)
def test_labels_mask_exactly_the_prompt(tokenizer, row, prompt):
    (example,), stats = tokenize_alpaca([row], tokenizer, sequence_len=512)
    ids, labels = example["input_ids"], example["labels"]
    n_prompt = len(tokenizer(prompt).input_ids)
    assert ids[:n_prompt] == tokenizer(prompt).input_ids
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(labels[n_prompt:-1]) == row["output"]
    assert ids[0] == tokenizer.bos_token_id
    assert (stats.truncated, stats.dropped_no_labels) == (0, 0)


def test_train_on_inputs_learns_every_token(tokenizer):
    row = {"instruction": "Name a primary colour.", "input": "", "output": "Red"}
    (example,), _ = tokenize_alpaca([row], tokenizer, sequence_len=512, train_on_inputs=True)
    assert example["labels"] == example["input_ids"]


def test_overlong_examples_are_cut_and_answerless_ones_dropped(tokenizer):
    rows = [
        {"instruction": "Name a primary colour.", "input": "", "output": "Red " * 50},
        {"instruction": "word " * 100, "input": "", "output": "x"},
    ]
    examples, stats = tokenize_alpaca(rows, tokenizer, sequence_len=40)
    assert [len(e["input_ids"]) for e in examples] == [40]
    assert (stats.examples, stats.truncated, stats.dropped_no_labels) == (1, 2, 1)
