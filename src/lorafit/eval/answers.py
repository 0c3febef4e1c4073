"""generate.py's work: answer one prompt, a file of prompts, or a person at the terminal, with
the model loaded once and the prompts put in the training template (lorafit.data.prompter).

Answers go to stdout and nothing else does (logs are on stderr), so the output pipes: one
prompt gives its answer as plain text, several give one JSON object per line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, TextIO

from lorafit.data.prompter import Prompter
from lorafit.errors import ConfigError

Answer = Callable[[Sequence[list[int]]], list[str]]  # prompt token ids -> completions


def read_prompts(source: str, stdin: TextIO | None = None) -> list[dict[str, str]]:
    """Instructions from a file (`-` for stdin): JSON lines with `instruction` (and optional
    `input`), or plain text with one instruction per line. Blank lines are skipped; a bad
    line is an error that names it."""
    if source == "-":
        text, name = (stdin or sys.stdin).read(), "stdin"
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(f"prompts_file={source}: no such file")
        text, name = path.read_text(encoding="utf-8"), str(path)
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            prompts.append({"instruction": line.strip(), "input": ""})
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{name} line {number}: not valid JSON ({error.msg})") from error
        if not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise ConfigError(f"{name} line {number}: no 'instruction' text")
        prompts.append({"instruction": row["instruction"], "input": str(row.get("input") or "")})
    if not prompts:
        raise ConfigError(f"{name}: holds no prompt")
    return prompts


def answer_all(
    prompts: Sequence[dict[str, str]], answer: Answer, prompter: Prompter, out: IO[str]
) -> None:
    """Answer every prompt (the model batches them) and write one JSON line each."""
    completions = answer([prompter.ask(p["instruction"], p["input"]) for p in prompts])
    for prompt, completion in zip(prompts, completions, strict=True):
        out.write(json.dumps({**prompt, "output": completion}, ensure_ascii=False) + "\n")
    out.flush()


def chat(
    answer: Answer, prompter: Prompter, lines: Iterable[str], out: IO[str], ask: IO[str]
) -> int:
    """Answer each line typed at the terminal until an empty line or end of input. With a
    chat template the conversation so far comes with every turn; the alpaca template has no
    earlier turns, so there each turn stands alone. Returns the turns."""
    turns = 0
    history: list[dict[str, str]] = []
    ask.write("Type an instruction; an empty line or Ctrl-D ends.\n> ")
    ask.flush()
    for line in lines:
        if not line.strip():
            break
        (completion,) = answer([prompter.ask(line.strip(), history=history)])
        completion = completion.strip()
        out.write(completion + "\n")
        out.flush()
        if prompter.keeps_history:
            history += [
                {"role": "user", "content": line.strip()},
                {"role": "assistant", "content": completion},
            ]
        turns += 1
        ask.write("> ")
        ask.flush()
    return turns
