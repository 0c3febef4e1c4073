"""model.special_tokens: tokens already in the vocabulary become the tokenizer's special tokens
when it loads; a new token (it would need resized embeddings) is refused by name."""

from __future__ import annotations

import pytest

from helpers import TINY, compose_config
from lorafit.errors import ConfigError
from lorafit.model.sources import MISTRAL_VOCAB_SIZE, mistral_tokenizer, set_special_tokens
from lorafit.training import build_run


def test_tokens_of_the_vocabulary_become_special_and_the_vocabulary_stays():
    tokenizer = set_special_tokens(mistral_tokenizer(), {"pad_token": "</s>", "bos_token": "</s>"})
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("</s>", 2)
    assert tokenizer.bos_token_id == 2 and len(tokenizer) == MISTRAL_VOCAB_SIZE
    # The BOS the tokenizer adds to each text is the new one.
    assert tokenizer("hi").input_ids[0] == 2


def test_no_special_tokens_leaves_the_tokenizer_as_loaded():
    tokenizer = set_special_tokens(mistral_tokenizer(), {})
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<s>",
        "</s>",
        "<unk>",
    )
    assert compose_config(TINY).model.special_tokens == {}


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (
            {"pad_token": "<|end_of_text|>"},
            r"model\.special_tokens\.pad_token='<\|end_of_text\|>' is not in the tokenizer's "
            r"vocabulary: .* adding new tokens \(which would need resizing the embeddings\) is "
            r"not supported",
        ),
        (
            {"pad": "</s>"},
            r"model\.special_tokens\.pad: not a special token; did you mean pad_token",
        ),
        ({"eos_token": 2}, r"model\.special_tokens\.eos_token=2 is not in the tokenizer's vocab"),
    ],
)
def test_what_cannot_be_honoured_is_refused_by_key(tokens, message):
    with pytest.raises(ConfigError, match=message):
        set_special_tokens(mistral_tokenizer(), tokens)


def test_a_tokenizer_that_would_keep_adding_the_old_bos_is_refused(monkeypatch):
    tokenizer = mistral_tokenizer()
    monkeypatch.setattr(tokenizer, "update_post_processor", lambda: None)
    with pytest.raises(
        ConfigError, match=r"model\.special_tokens\.bos_token: .*still adds \['<s>'\]"
    ):
        set_special_tokens(tokenizer, {"bos_token": "</s>"})


def test_a_run_trains_with_the_configured_tokens(tmp_path):
    overrides = [*TINY, "trainer.max_steps=1", "+model.special_tokens.pad_token='</s>'"]
    run = build_run(compose_config(overrides, tmp_path))
    assert run.datamodule.tokenizer.pad_token_id == 2
    bad = [*TINY, "+model.special_tokens.eos_token='<|im_end|>'"]
    with pytest.raises(ConfigError, match=r"model\.special_tokens\.eos_token='<\|im_end\|>'"):
        build_run(compose_config(bad, tmp_path / "bad"))
