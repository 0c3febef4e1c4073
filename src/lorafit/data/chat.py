"""Chat templates: conversations rendered the way the model will see them, and the assistant
turns found in the rendering so that only they are learned.

A turn is located by rendering the conversation up to it with the generation prompt (the text
a model is given before it replies) and the conversation through it: the reply is what lies
between the two (lorafit.data.tokenization.tokenize_conversation). That only works for a
template whose rendering of a conversation begins with its rendering of the earlier turns,
and that marks the assistant's turns at all; `resolve` probes the template for both before
any row is tokenized, so a template that cannot locate the replies is an error, never a
silently all-masked or all-learned label set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from lorafit.errors import DataError

TOKENIZER_DEFAULT = "tokenizer_default"
# ChatML, without a default system prompt. Its markers are plain text to a tokenizer that
# lacks them as special tokens, which works, at a few tokens per marker.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML}
SETTING = "data.chat_template"
_PROBE_QUESTION = "lorafit probe question"
_PROBE_REPLY = "lorafit probe reply"

Messages = Sequence[Mapping[str, str]]


def check_setting(value: object) -> None:
    """`data.chat_template` without a tokenizer: a known name or a Jinja template."""
    if value == TOKENIZER_DEFAULT or value in NAMED_TEMPLATES:
        return
    if isinstance(value, str) and ("{{" in value or "{%" in value):
        return
    names = ", ".join([TOKENIZER_DEFAULT, *NAMED_TEMPLATES])
    raise DataError(f"{SETTING}={value!r}: expected {names}, or a Jinja chat template")


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template bound to a tokenizer.

    `add_special_tokens`: the tokenizer's own template writes its special tokens (BOS...)
    itself, as transformers' `apply_chat_template` assumes; a named or given template leaves
    them to the tokenizer, as plain text is tokenized.
    """

    tokenizer: PreTrainedTokenizerBase
    source: str
    name: str
    add_special_tokens: bool
    end_of_turn: str = ""  # what the template writes after a reply (e.g. <|im_end|>)

    def render(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                [dict(m) for m in messages],
                chat_template=self.source,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except TemplateError as error:
            raise DataError(f"{SETTING}={self.name}: the template failed: {error}") from error

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=self.add_special_tokens)["input_ids"]

    def prompt(self, messages: Messages) -> str:
        """The text a model is given to write the next assistant turn after `messages`."""
        return self.render(messages, add_generation_prompt=True)


def resolve(tokenizer: PreTrainedTokenizerBase, setting: str) -> ChatTemplate:
    """The template `data.chat_template` names, checked to locate assistant turns."""
    check_setting(setting)
    if setting == TOKENIZER_DEFAULT:
        if not tokenizer.chat_template:
            raise DataError(
                f"{SETTING}={TOKENIZER_DEFAULT}, but the model's tokenizer has no chat "
                f"template; set {SETTING}=chatml or give a Jinja template"
            )
        template = ChatTemplate(tokenizer, tokenizer.chat_template, setting, False)
    else:
        name = setting if setting in NAMED_TEMPLATES else "<given Jinja template>"
        template = ChatTemplate(tokenizer, NAMED_TEMPLATES.get(setting, setting), name, True)
    question = {"role": "user", "content": _PROBE_QUESTION}
    replied = template.render([question, {"role": "assistant", "content": _PROBE_REPLY}])
    asked_twice = template.render([question, {"role": "user", "content": _PROBE_REPLY}])
    if replied == asked_twice:
        raise DataError(
            f"{SETTING}={template.name}: the template renders an assistant turn exactly like a "
            "user turn, so the replies to learn cannot be told apart; use a template with "
            "role markers (e.g. chatml)"
        )
    prompt = template.prompt([question])
    reply = replied[len(prompt) :]
    if not replied.startswith(prompt) or _PROBE_REPLY not in reply:
        raise DataError(
            f"{SETTING}={template.name}: the template's rendering of a reply does not begin "
            "with the prompt it renders for that reply, so the assistant turns cannot be "
            "located; use a template that only appends turns (e.g. chatml)"
        )
    end = reply[reply.index(_PROBE_REPLY) + len(_PROBE_REPLY) :].strip()
    return replace(template, end_of_turn=end)


def prompt_and_reference(messages: Messages) -> tuple[list[Mapping[str, str]], str]:
    """The conversation before its last assistant turn, and that turn (what eval scores)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return list(messages[:last]), messages[last]["content"]
