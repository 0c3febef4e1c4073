"""generate.py's prompt sources: a file of instructions (text or JSON lines), stdin, and the
terminal, each answered in the training template with the model loaded once."""

from __future__ import annotations

import io
import json

import pytest

from lorafit.data import chat as chat_templates
from lorafit.data.prompter import Prompter
from lorafit.data.prompts import alpaca_prompt
from lorafit.errors import ConfigError
from lorafit.eval.answers import answer_all, chat, read_prompts
from lorafit.model.sources import mistral_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return mistral_tokenizer()


def _ids(tokenizer, text):
    return tokenizer(text)["input_ids"]


class Recorder:
    """An answer function that records the batches it was given."""

    def __init__(self):
        self.batches: list[list[str]] = []

    def __call__(self, prompts):
        self.batches.append(list(prompts))
        return [f"answer {len(self.batches)}.{i}" for i in range(len(prompts))]


def test_text_and_json_lines_and_stdin_give_the_same_prompts(tmp_path):
    text = tmp_path / "q.txt"
    text.write_text("Name a colour.\n\n  Add 2 and 3.  \n")
    lines = tmp_path / "q.jsonl"
    rows = [{"instruction": "Name a colour."}, {"instruction": "Add 2 and 3.", "input": ""}]
    lines.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    expected = [
        {"instruction": "Name a colour.", "input": ""},
        {"instruction": "Add 2 and 3.", "input": ""},
    ]
    assert read_prompts(str(text)) == read_prompts(str(lines)) == expected
    assert read_prompts("-", stdin=io.StringIO(text.read_text())) == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"instruction": "a"}\n{"instruction": \n', r"line 2: not valid JSON"),
        ('{"input": "x"}\n', r"line 1: no 'instruction' text"),
        ("\n\n", r"holds no prompt"),
    ],
)
def test_a_bad_prompts_file_names_the_line(tmp_path, content, message):
    path = tmp_path / "q.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_prompts(str(path))
    with pytest.raises(ConfigError, match="no such file"):
        read_prompts(str(tmp_path / "missing.txt"))


def test_all_prompts_are_answered_in_one_batch_call_as_json_lines(tokenizer):
    prompts = [{"instruction": f"Say {i}.", "input": "x" if i == 1 else ""} for i in range(3)]
    recorder, out = Recorder(), io.StringIO()
    answer_all(prompts, recorder, Prompter(tokenizer, "alpaca", None), out)
    expected = [_ids(tokenizer, alpaca_prompt(p["instruction"], p["input"])) for p in prompts]
    assert recorder.batches == [expected]
    written = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [w["output"] for w in written] == ["answer 1.0", "answer 1.1", "answer 1.2"]
    assert [w["instruction"] for w in written] == ["Say 0.", "Say 1.", "Say 2."]


def test_chat_answers_each_line_until_an_empty_one(tokenizer):
    recorder, out, ask = Recorder(), io.StringIO(), io.StringIO()
    lines = iter(["Name a colour.\n", "Add 2 and 3.\n", "\n", "ignored\n"])
    turns = chat(recorder, Prompter(tokenizer, "alpaca", None), lines, out, ask)
    assert turns == 2 and out.getvalue() == "answer 1.0\nanswer 2.0\n"
    assert recorder.batches == [
        [_ids(tokenizer, alpaca_prompt("Name a colour."))],
        [_ids(tokenizer, alpaca_prompt("Add 2 and 3."))],
    ]
    assert "> " in ask.getvalue() and "> " not in out.getvalue()  # the prompt is not an answer


def test_with_a_chat_template_each_turn_carries_the_conversation_so_far(tokenizer):
    template = chat_templates.resolve(tokenizer, "chatml")
    recorder, out, ask = Recorder(), io.StringIO(), io.StringIO()
    chat(recorder, Prompter(tokenizer, "chat", template), iter(["Hi.\n", "Again?\n"]), out, ask)
    assert recorder.batches[1][0] == _ids(
        tokenizer,
        "<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\nanswer 1.0<|im_end|>\n"
        "<|im_start|>user\nAgain?<|im_end|>\n<|im_start|>assistant\n",
    )
