"""Raw text (completion), conversations (chat) and weighted mixtures of sources: what each
row shape becomes in tokens and labels, checked against the tokenizer's own rendering."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import pytest
import torch
from hydra.utils import instantiate

from helpers import SHARED_DATA, compose_config, packed_test_module
from lorafit.constants import IGNORE_INDEX
from lorafit.data import chat, prepared_cache
from lorafit.data.datamodule import FineTuneDataModule
from lorafit.data.examples import PackedExamples, TokenizedExamples
from lorafit.data.mixing import mix, shares
from lorafit.data.packing import pack_rows, packed_collate
from lorafit.data.prompter import Prompter
from lorafit.data.sources import load_rows
from lorafit.data.tokenization import split_document, tokenize_rows
from lorafit.errors import DataError
from lorafit.model.losses import token_loss_sum
from lorafit.model.sources import mistral_tokenizer

SYSTEM = {"role": "system", "content": "Answer briefly."}
USER = {"role": "user", "content": "What is the capital of France?"}
REPLY = {"role": "assistant", "content": "Paris."}


@pytest.fixture(scope="module")
def mistral():
    return mistral_tokenizer()


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's tokenizer and its own chat template (ChatML-like)."""
    return instantiate(compose_config(["model=smollm2_135m"]).model.source).load_tokenizer()


def _documents(count: int = 12) -> list[dict[str, str]]:
    """Real web text when the shared sample is present, else generated prose."""
    path = SHARED_DATA / "c4_demo.jsonl"
    if path.is_file():
        with path.open() as lines:
            return [
                {"text": json.loads(line)["text"]}
                for _, line in zip(range(count), lines, strict=False)
            ]
    words = "the quick brown fox jumps over a lazy dog while rain falls on old roofs".split()
    return [
        {"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(40 + 30 * i))}
        for i in range(count)
    ]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- completion --------------------------------------------------------------------------


def test_a_split_document_joins_back_and_every_token_after_the_first_is_learned_once(mistral):
    documents = _documents()
    examples, stats = tokenize_rows(documents, mistral, sequence_len=64, overlong="split")
    assert stats.split_documents > 0
    whole = mistral([d["text"] for d in documents])["input_ids"]
    at = 0
    for ids in whole:
        document = [*ids, mistral.eos_token_id]  # BOS from the tokenizer, EOS appended
        pieces = split_document(document, 64)
        assert examples[at : at + len(pieces)] == [
            {"input_ids": piece, "labels": piece} for piece in pieces
        ]
        # Joined back (each continuation starts on its predecessor's last token)...
        joined = pieces[0] + [t for piece in pieces[1:] for t in piece[1:]]
        assert joined == document
        # ...and each token but the first is a target (a label after position 0) exactly once.
        assert sum(len(piece) - 1 for piece in pieces) == len(document) - 1
        assert all(len(piece) <= 64 for piece in pieces)
        at += len(pieces)
    assert at == len(examples)


def test_truncate_and_drop_keep_a_long_document_whole_or_not_at_all(mistral):
    documents = [{"text": "word " * 200}, {"text": "short text"}]
    cut, stats = tokenize_rows(documents, mistral, 32, overlong="truncate")
    assert [len(e["input_ids"]) for e in cut][0] == 32 and stats.truncated == 1
    kept, stats = tokenize_rows(documents, mistral, 32, overlong="drop")
    assert len(kept) == 1 and stats.dropped_overlong == 1
    assert kept[0]["input_ids"][-1] == mistral.eos_token_id


def test_packed_documents_are_isolated_loss_equal_to_each_run_alone(mistral):
    examples, _ = tokenize_rows(_documents(), mistral, sequence_len=96, overlong="split")
    flat = TokenizedExamples.from_lists(examples)
    packed = PackedExamples(flat, pack_rows(flat.lengths().tolist(), 256))
    row = next(i for i, r in enumerate(packed.rows) if len(r) >= 3)
    module = packed_test_module().eval()
    batch = packed_collate([packed[row]], pad_token_id=0, pad_to=256)
    with torch.no_grad():
        logits = module(batch["input_ids"], position_ids=batch["position_ids"])
        packed_loss, packed_count = token_loss_sum(logits, batch["labels"])
        total, count = 0.0, 0
        for member in packed.rows[row]:
            alone = flat.example(member)
            ids = torch.tensor([alone["input_ids"]])
            loss, n = token_loss_sum(module(ids), torch.tensor([alone["labels"]]))
            total, count = total + loss, count + n
    assert (
        packed_count
        == count
        == sum(len(flat.example(m)["input_ids"]) - 1 for m in packed.rows[row])
    )
    torch.testing.assert_close(packed_loss, total, rtol=1e-4, atol=1e-4)


def test_a_text_column_of_another_name_and_csv_files_are_read(tmp_path):
    csv = tmp_path / "docs.csv"
    csv.write_text('body,source\n"First, document.",web\nSecond one,book\n')
    rows = load_rows([{"path": str(csv), "type": "completion", "text_field": "body"}])
    assert rows == [{"text": "First, document."}, {"text": "Second one"}]


# --- chat ----------------------------------------------------------------------------------


def _learned(example):
    return [
        t
        for t, label in zip(example["input_ids"], example["labels"], strict=True)
        if label != IGNORE_INDEX
    ]


def test_only_the_reply_is_learned_token_by_token_in_the_tokenizers_own_template(smollm2):
    template = chat.resolve(smollm2, chat.TOKENIZER_DEFAULT)
    messages = [SYSTEM, USER, REPLY]
    (example,), _ = tokenize_rows([{"messages": messages}], smollm2, 256, chat_template=template)
    rendered = smollm2.apply_chat_template(messages, tokenize=False)
    prompt = smollm2.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    # The ids are the template's own rendering, tokenized as apply_chat_template does.
    assert example["input_ids"] == smollm2(rendered, add_special_tokens=False)["input_ids"]
    n_prompt = len(smollm2(prompt, add_special_tokens=False)["input_ids"])
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt  # system, user, header
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert smollm2.decode(_learned(example)) == "Paris.<|im_end|>\n"
    masked = smollm2.decode([t for t in example["input_ids"][:n_prompt]])
    assert "Answer briefly." in masked and "capital of France" in masked
    assert masked.endswith("<|im_start|>assistant\n")


def test_every_assistant_turn_of_a_conversation_is_learned(smollm2):
    template = chat.resolve(smollm2, chat.TOKENIZER_DEFAULT)
    messages = [
        SYSTEM,
        USER,
        REPLY,
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid."},
    ]
    (example,), _ = tokenize_rows([{"messages": messages}], smollm2, 256, chat_template=template)
    assert smollm2.decode(_learned(example)) == "Paris.<|im_end|>\nMadrid.<|im_end|>\n"
    learned_positions = [i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
    # Two separate spans: the second question between them is not learned.
    gaps = [b - a for a, b in zip(learned_positions, learned_positions[1:], strict=False)]
    assert sum(gap > 1 for gap in gaps) == 1
    (everything,), _ = tokenize_rows(
        [{"messages": messages}], smollm2, 256, train_on_inputs=True, chat_template=template
    )
    assert everything["labels"] == everything["input_ids"] == example["input_ids"]


def test_chatml_on_a_tokenizer_without_a_template_and_sharegpt_rows(mistral, tmp_path):
    path = _write_jsonl(
        tmp_path / "sharegpt.jsonl",
        [
            {
                "conversations": [
                    {"from": "human", "value": "Hi?"},
                    {"from": "gpt", "value": "Hello."},
                ]
            }
        ],
    )
    rows = load_rows([{"path": str(path), "type": "chat"}])
    assert rows == [
        {
            "messages": [
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."},
            ]
        }
    ]
    template = chat.resolve(mistral, "chatml")
    assert template.end_of_turn == "<|im_end|>"
    (example,), _ = tokenize_rows(rows, mistral, 256, chat_template=template)
    assert example["input_ids"][0] == mistral.bos_token_id  # the tokenizer adds its BOS
    assert mistral.decode(_learned(example)).strip() == "Hello.<|im_end|>"


def test_a_template_that_cannot_locate_replies_is_refused(mistral):
    no_roles = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    with pytest.raises(DataError, match="renders an assistant turn exactly like a user turn"):
        chat.resolve(mistral, no_roles)
    # Reply first, then its question: the prompt is not where the conversation begins.
    reordered = (
        "{% for m in messages|reverse %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    with pytest.raises(DataError, match="assistant turns cannot be located"):
        chat.resolve(mistral, reordered)
    with pytest.raises(DataError, match="has no chat template"):
        chat.resolve(mistral, chat.TOKENIZER_DEFAULT)


def test_eval_prompts_are_the_training_tokens_before_the_last_reply(smollm2):
    template = chat.resolve(smollm2, chat.TOKENIZER_DEFAULT)
    row = {"messages": [SYSTEM, USER, REPLY]}
    (example,), _ = tokenize_rows([row], smollm2, 256, chat_template=template)
    prompter = Prompter(smollm2, "chat", template)
    prompt = prompter.row_prompt(row)
    first_learned = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    assert prompt == example["input_ids"][:first_learned]
    assert prompter.reference(row) == "Paris." and prompter.asked(row) == USER["content"]
    assert prompter.ask(USER["content"], history=[SYSTEM]) == prompt
    assert prompter.stop_token_ids == [smollm2.eos_token_id]  # <|im_end|> is its EOS


# --- several sources ----------------------------------------------------------------------


def test_shares_follow_the_weights_and_sum_to_the_total():
    assert shares([3, 1], 200) == [150, 50]
    assert shares([1, 1, 1], 10) == [4, 3, 3] or sorted(shares([1, 1, 1], 10)) == [3, 3, 4]
    assert sum(shares([0.2, 0.3, 0.5], 7)) == 7


def test_mixing_two_sources_gives_their_proportions_on_a_fixed_seed():
    owners = [0] * 100 + [1] * 300  # a small source and a large one
    train = list(range(400))
    mixture = mix(train, owners, [3, 1], seed=7)
    counts = Counter(owners[i] for i in mixture)
    assert counts == {0: 300, 1: 100}  # 3:1 of the 400 rows
    small = Counter(i for i in mixture if owners[i] == 0)
    assert set(small.values()) == {3}  # the small source three times over, whole
    assert len(set(i for i in mixture if owners[i] == 1)) == 100  # a draw without repeats
    assert mix(train, owners, [3, 1], seed=7) == mixture
    assert mix(train, owners, [3, 1], seed=8) != mixture


def test_the_datamodule_mixes_alpaca_and_raw_text_by_weight(mistral, tmp_path):
    alpaca = _write_jsonl(
        tmp_path / "a.jsonl", [{"instruction": f"Say {i}.", "output": str(i)} for i in range(30)]
    )
    text = _write_jsonl(tmp_path / "t.jsonl", [{"text": f"document {i} " * 5} for i in range(90)])
    sources = [
        {"path": str(alpaca), "type": "alpaca", "weight": 1},
        {"path": str(text), "type": "completion", "weight": 1},
    ]
    module = FineTuneDataModule(sources, 64, 0.1, False, 4, 4, seed=3)
    train, val = module.load_rows()
    assert len(train) + len(val) == 120 and len(val) == 12
    counts = Counter("text" in row for row in train)
    assert counts == {False: 54, True: 54}  # half each, of the 108 training rows
    module.connect(mistral)
    module.setup()
    assert len(module.splits["train"].examples) == 108


def test_the_cache_key_covers_each_sources_type_and_weight(mistral, tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "output": "hi"}] * 4)

    def key(**changes):
        source = {"path": str(path), "type": "alpaca", **changes}
        module = FineTuneDataModule([source], 64, 0, False, 4, 4)
        module.connect(mistral)
        train, val = module.load_rows()
        return prepared_cache.cache_key([train, val], mistral, module.settings())

    assert len({key(), key(weight=2), key(text_field="other")}) == 3


def test_hub_sources_pass_their_config_name_split_and_revision(monkeypatch):
    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list([{"text": "a document"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    source = {
        "path": "allenai/c4",
        "name": "en",
        "type": "completion",
        "split": "validation",
        "revision": "1588ec4",
    }
    assert load_rows([source]) == [{"text": "a document"}]
    assert calls == [("allenai/c4", "en", {"revision": "1588ec4", "split": "validation"})]
