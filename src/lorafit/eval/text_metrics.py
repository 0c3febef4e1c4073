"""Metrics that compare generated answers with reference answers, as plain strings.

Everything here is pure: lists of strings in, floats out, no model and no files, so `eval.py` can
score any generations and the tests can check each number by hand.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)
from torchmetrics.text import ROUGEScore

_WHITESPACE = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Strip surrounding whitespace and collapse internal whitespace runs to one space.

    Generations often end with a newline or a trailing space (the model stops on EOS right after
    one), or wrap a line where the reference did not; none of that changes the answer, so it must
    not make an exact match fail. Case, punctuation and everything else are kept as they are.
    """
    return _WHITESPACE.sub(" ", text).strip()


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    """Raise ValueError unless both sequences are non-empty and of the same length."""
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} references; "
            "each prediction needs exactly one reference"
        )
    if not predictions:
        raise ValueError("no predictions to score: the metric of an empty set is undefined")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of pairs that are equal after `normalize_answer`.

    Raises:
        ValueError: If the inputs are empty or differ in length.
    """
    _check_pairs(predictions, references)
    hits = sum(
        normalize_answer(p) == normalize_answer(r)
        for p, r in zip(predictions, references, strict=True)
    )
    return hits / len(predictions)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure over the pairs, one reference per prediction.

    Text is tokenized the torchmetrics way: lowercased, every run of characters other than
    `a-z0-9` is a separator. F = 2PR / (P + R) with P = LCS / prediction tokens and
    R = LCS / reference tokens, per pair, then averaged over the pairs.

    A pair whose prediction and reference are both empty after `normalize_answer` (the model
    correctly said nothing) scores 1.0: they agree perfectly. torchmetrics alone would score it
    0.0, like any pair with an empty side; a pair where only one side is empty, or where either
    side has no letters or digits (e.g. only punctuation), still scores 0.0.

    Raises:
        ValueError: If the inputs are empty or differ in length.
    """
    _check_pairs(predictions, references)
    scored = [
        (p, r)
        for p, r in zip(predictions, references, strict=True)
        if normalize_answer(p) or normalize_answer(r)
    ]
    both_empty = len(predictions) - len(scored)
    total = float(both_empty)  # each both-empty pair contributes F = 1.0
    if scored:
        # rougeL alone, without the Porter stemmer, needs no extra package: torchmetrics imports
        # nltk only for `use_stemmer=True` or the `rougeLsum` key (sentence splitting), so those
        # stay off. `accumulate` does not matter with a single reference per prediction.
        metric = ROUGEScore(rouge_keys="rougeL", use_stemmer=False)
        metric.update([p for p, _ in scored], [r for _, r in scored])
        mean_scored = float(metric.compute()["rougeL_fmeasure"])
        total += mean_scored * len(scored)
    return total / len(predictions)


def classification_metrics(
    predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]
) -> dict[str, float]:
    """Accuracy, precision, recall and F1 for answers that should be one label out of a set.

    Only rows whose normalized reference is one of `labels` are scored; the others are not a
    classification question and are ignored. A normalized prediction that is not one of the
    labels goes to an extra "other" class that is never a target, so it is wrong for every
    class: a miss (false negative) for its reference's class and a false positive for none of
    the given labels. Macro averages are over the given labels only, never over "other".

    A class that is never predicted has precision 0.0, and one that never occurs among the
    scored references has recall 0.0 (as scikit-learn's `zero_division=0`); F1 is 0.0 when
    precision and recall are both 0. Such classes still count in the macro averages.

    Args:
        predictions: Generated answers, one per reference.
        references: Reference answers.
        labels: The class names, compared with the normalized strings (case-sensitive).

    Returns:
        `accuracy` (share of scored rows with the right label), `precision_macro`,
        `recall_macro`, `f1_macro`, per label `precision/<label>`, `recall/<label>`,
        `f1/<label>` as floats; `support/<label>` (scored references of that label) and `rows`
        (how many rows were scored) as ints.

    Raises:
        ValueError: If the inputs are empty or differ in length, `labels` is empty or repeats a
            label, or no reference is one of the labels.
    """
    _check_pairs(predictions, references)
    label_list = [normalize_answer(label) for label in labels]
    if not label_list:
        raise ValueError("labels is empty: give at least one class name")
    if len(set(label_list)) != len(label_list) or "" in label_list:
        raise ValueError(f"labels must be distinct and non-empty after normalization: {labels!r}")

    index = {label: i for i, label in enumerate(label_list)}
    other = len(label_list)  # the extra class for predictions outside the label set
    pred_ids: list[int] = []
    target_ids: list[int] = []
    for p, r in zip(predictions, references, strict=True):
        ref = normalize_answer(r)
        if ref not in index:
            continue
        target_ids.append(index[ref])
        pred_ids.append(index.get(normalize_answer(p), other))
    if not target_ids:
        raise ValueError(f"no reference is one of the labels {label_list!r}: nothing to score")

    preds = torch.tensor(pred_ids)
    target = torch.tensor(target_ids)
    num_classes = other + 1
    kwargs = {"num_classes": num_classes, "average": "none", "zero_division": 0}
    precision = multiclass_precision(preds, target, **kwargs)[:other]
    recall = multiclass_recall(preds, target, **kwargs)[:other]
    f1 = multiclass_f1_score(preds, target, **kwargs)[:other]
    accuracy = multiclass_accuracy(preds, target, num_classes=num_classes, average="micro")
    support = torch.bincount(target, minlength=num_classes)[:other]

    result: dict[str, float] = {
        "accuracy": float(accuracy),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
    }
    for i, label in enumerate(label_list):
        result[f"precision/{label}"] = float(precision[i])
        result[f"recall/{label}"] = float(recall[i])
        result[f"f1/{label}"] = float(f1[i])
        result[f"support/{label}"] = int(support[i])
    result["rows"] = len(target_ids)
    return result
