"""Each text metric against a value worked out by hand on a small fixed case."""

from __future__ import annotations

import pytest

from lorafit.eval.text_metrics import classification_metrics, exact_match, normalize_answer, rouge_l


def test_normalize_answer_strips_and_collapses_whitespace_only():
    assert normalize_answer("  Paris\n") == "Paris"
    assert normalize_answer("New \t York\n\nCity ") == "New York City"
    assert normalize_answer("Yes.") == "Yes."  # punctuation kept
    assert normalize_answer("yes") != normalize_answer("Yes")  # case kept
    assert normalize_answer(" \n ") == ""


def test_exact_match_two_of_three_with_whitespace_differences():
    predictions = ["Paris\n", "  the  answer is 4 ", "Berlin"]
    references = ["Paris", "the answer is 4", "berlin"]  # the third differs in case only
    assert exact_match(predictions, references) == pytest.approx(2 / 3)


def test_exact_match_errors():
    with pytest.raises(ValueError, match="empty"):
        exact_match([], [])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])


def test_rouge_l_by_hand():
    # prediction: the cat sat on the mat       (6 tokens)
    # reference:  a cat was on the mat today   (7 tokens)
    # LCS = "cat on the mat" = 4 tokens
    # P = 4/6 = 2/3, R = 4/7, F = 2PR / (P + R) = (16/21) / (26/21) = 8/13 ~ 0.6154
    pair_f = 8 / 13
    assert rouge_l(["the cat sat on the mat"], ["a cat was on the mat today"]) == pytest.approx(
        pair_f, abs=1e-6
    )
    # Identical texts score 1 (case and punctuation are ignored by ROUGE's tokenizer), disjoint
    # texts 0; the result is the mean over pairs: (8/13 + 1 + 0) / 3.
    score = rouge_l(
        ["the cat sat on the mat", "Hello, World!", "alpha beta"],
        ["a cat was on the mat today", "hello world", "gamma delta"],
    )
    assert score == pytest.approx((pair_f + 1.0 + 0.0) / 3, abs=1e-6)


def test_rouge_l_empty_strings():
    # Both sides empty (after whitespace normalization) count as perfect agreement: 1.0.
    assert rouge_l([""], [""]) == 1.0
    assert rouge_l([" \n"], [""]) == 1.0
    # Only one side empty: nothing in common, 0.0.
    assert rouge_l([""], ["something"]) == 0.0
    assert rouge_l(["something"], [""]) == 0.0
    # Mixed with a scored pair, the both-empty pair contributes its 1.0 to the mean.
    assert rouge_l(["", "a b"], ["", "c d"]) == pytest.approx(0.5)


def test_rouge_l_errors():
    with pytest.raises(ValueError, match="empty"):
        rouge_l([], [])
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        rouge_l(["a"], ["a", "b"])


def test_classification_metrics_by_hand():
    labels = ["positive", "negative"]
    predictions = [
        "positive",  # ref positive: correct
        "positive\n",  # ref positive: correct (whitespace ignored)
        "negative",  # ref positive: wrong, a false positive for negative
        "negative",  # ref negative: correct
        "positive",  # ref negative: wrong, a false positive for positive
        "maybe",  # ref negative: outside the labels, wrong for every class
        "positive",  # ref "neutral" is not a label: row ignored
    ]
    references = [
        "positive",
        "positive",
        "positive",
        "negative",
        "negative",
        " negative",
        "neutral",
    ]
    m = classification_metrics(predictions, references, labels)

    # 6 scored rows, 3 correct.
    assert m["rows"] == 6
    assert m["accuracy"] == pytest.approx(3 / 6)
    # positive: predicted 3 times (rows 1, 2, 5), 2 right -> P = 2/3; support 3, 2 found -> R = 2/3
    #           F1 = 2/3.
    # negative: predicted 2 times (rows 3, 4), 1 right -> P = 1/2; support 3, 1 found -> R = 1/3
    #           F1 = 2 * (1/2) * (1/3) / (1/2 + 1/3) = (1/3) / (5/6) = 2/5.
    expected = {
        "precision/positive": 2 / 3,
        "recall/positive": 2 / 3,
        "f1/positive": 2 / 3,
        "precision/negative": 1 / 2,
        "recall/negative": 1 / 3,
        "f1/negative": 2 / 5,
        # macro over the two labels only, never the "other" class of "maybe"
        "precision_macro": (2 / 3 + 1 / 2) / 2,  # 7/12
        "recall_macro": (2 / 3 + 1 / 3) / 2,  # 1/2
        "f1_macro": (2 / 3 + 2 / 5) / 2,  # 8/15
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-6), key
    assert m["support/positive"] == 3
    assert m["support/negative"] == 3
    assert set(m) == {"accuracy", "rows", "precision_macro", "recall_macro", "f1_macro"} | {
        f"{kind}/{label}" for kind in ("precision", "recall", "f1", "support") for label in labels
    }


def test_classification_class_never_predicted_has_zero_precision():
    # "no" is never predicted: precision 0 (zero_division=0), recall 0, F1 0.
    m = classification_metrics(["yes", "yes", "dunno"], ["yes", "no", "no"], ["yes", "no"])
    assert m["precision/no"] == 0.0
    assert m["recall/no"] == 0.0
    assert m["f1/no"] == 0.0
    # yes: predicted twice, right once -> P = 1/2; support 1, found -> R = 1; F1 = 2/3
    assert m["precision/yes"] == pytest.approx(1 / 2)
    assert m["recall/yes"] == pytest.approx(1.0)
    assert m["f1/yes"] == pytest.approx(2 / 3)
    assert m["f1_macro"] == pytest.approx(1 / 3)
    assert m["accuracy"] == pytest.approx(1 / 3)


def test_classification_errors():
    with pytest.raises(ValueError, match="no reference is one of the labels"):
        classification_metrics(["yes"], ["maybe"], ["yes", "no"])
    with pytest.raises(ValueError, match="empty"):
        classification_metrics([], [], ["yes", "no"])
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        classification_metrics(["yes"], ["yes", "no"], ["yes", "no"])
    with pytest.raises(ValueError, match="labels is empty"):
        classification_metrics(["yes"], ["yes"], [])
    with pytest.raises(ValueError, match="distinct"):
        classification_metrics(["yes"], ["yes"], ["yes", "yes "])
