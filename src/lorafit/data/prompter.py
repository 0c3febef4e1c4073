"""Prompts for eval.py and generate.py, tokenized exactly as training tokenized them.

A run trained on chat rows is prompted through its chat template (and may hold a
conversation), one trained on alpaca rows through the alpaca template, and one trained on raw
text alone is given the text to continue.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from lorafit.data.chat import ChatTemplate, prompt_and_reference
from lorafit.data.prompts import alpaca_prompt
from lorafit.data.rows import row_type

Message = Mapping[str, str]


class Prompter:
    """Prompt token ids for held-out rows and for new instructions.

    Args:
        tokenizer: The model's tokenizer.
        style: "chat", "alpaca" or "completion": the row type the run learned to answer.
        template: The chat template (for chat rows or style).
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, style: str, template: ChatTemplate | None
    ):
        self.tokenizer, self.style, self.template = tokenizer, style, template

    @property
    def keeps_history(self) -> bool:
        """Whether a conversation's earlier turns reach the next prompt (chat templates)."""
        return self.style == "chat"

    def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def _chat(self, messages: Sequence[Message]) -> list[int]:
        text = self.template.prompt(messages)
        return self._encode(text, self.template.add_special_tokens)

    def scorable(self, row: Mapping[str, Any]) -> bool:
        """Rows with a reference answer to score a generation against (not raw text)."""
        return row_type(row) != "completion"

    def row_prompt(self, row: Mapping[str, Any]) -> list[int]:
        """The prompt of a held-out alpaca or chat row, up to where its answer begins."""
        if row_type(row) == "chat":
            return self._chat(prompt_and_reference(row["messages"])[0])
        return self._encode(alpaca_prompt(row["instruction"], row.get("input")))

    @staticmethod
    def reference(row: Mapping[str, Any]) -> str:
        if row_type(row) == "chat":
            return prompt_and_reference(row["messages"])[1]
        return row["output"]

    @staticmethod
    def asked(row: Mapping[str, Any]) -> str:
        """What a reader of the report needs to see of the prompt: the last question."""
        if row_type(row) == "chat":
            before, _ = prompt_and_reference(row["messages"])
            users = [m["content"] for m in before if m["role"] == "user"]
            return users[-1] if users else before[-1]["content"] if before else ""
        extra = row.get("input") or ""
        return row["instruction"] + (f"\n\n{extra}" if extra.strip() else "")

    def ask(
        self,
        instruction: str,
        input: str = "",
        history: Sequence[Message] = (),  # noqa: A002
    ) -> list[int]:
        """The prompt for a new instruction (after `history`, for chat)."""
        if self.style == "chat":
            question = instruction + (f"\n\n{input}" if input.strip() else "")
            return self._chat([*history, {"role": "user", "content": question}])
        if self.style == "completion":
            return self._encode(instruction + (f"\n\n{input}" if input.strip() else ""))
        return self._encode(alpaca_prompt(instruction, input))

    def _end_ids(self) -> list[int]:
        end = self.template.end_of_turn if self.template is not None else ""
        return self._encode(end, add_special_tokens=False) if end else []

    @property
    def stop_token_ids(self) -> list[int]:
        """Tokens that end a reply: EOS, and the template's end of turn when it is one token."""
        end = self._end_ids()
        extra = end if len(end) == 1 and end[0] != self.tokenizer.eos_token_id else []
        return [self.tokenizer.eos_token_id, *extra]

    @property
    def stop_strings(self) -> list[str]:
        """The template's end of turn when the tokenizer spells it in several tokens."""
        return [self.template.end_of_turn] if len(self._end_ids()) > 1 else []

    def clean(self, completion: str) -> str:
        """A completion cut at the template's end of turn, when the tokens spelled it."""
        for stop in self.stop_strings:
            completion = completion.split(stop, 1)[0]
        return completion
