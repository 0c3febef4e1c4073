"""generate.py's prompt sources: a file of instructions (text or JSON lines), stdin, and the
terminal, each answered in the training template with the model loaded once."""

from __future__ import annotations

import io
import json

import pytest

from lorafit.data.prompts import alpaca_prompt
from lorafit.errors import ConfigError
from lorafit.eval.answers import answer_all, chat, read_prompts


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


def test_all_prompts_are_answered_in_one_batch_call_as_json_lines():
    prompts = [{"instruction": f"Say {i}.", "input": "x" if i == 1 else ""} for i in range(3)]
    recorder, out = Recorder(), io.StringIO()
    answer_all(prompts, recorder, out)
    assert recorder.batches == [[alpaca_prompt(p["instruction"], p["input"]) for p in prompts]]
    written = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [w["output"] for w in written] == ["answer 1.0", "answer 1.1", "answer 1.2"]
    assert [w["instruction"] for w in written] == ["Say 0.", "Say 1.", "Say 2."]


def test_chat_answers_each_line_until_an_empty_one():
    recorder, out, ask = Recorder(), io.StringIO(), io.StringIO()
    turns = chat(
        recorder, iter(["Name a colour.\n", "Add 2 and 3.\n", "\n", "ignored\n"]), out, ask
    )
    assert turns == 2 and out.getvalue() == "answer 1.0\nanswer 2.0\n"
    assert recorder.batches == [[alpaca_prompt("Name a colour.")], [alpaca_prompt("Add 2 and 3.")]]
    assert "> " in ask.getvalue() and "> " not in out.getvalue()  # the prompt is not an answer
