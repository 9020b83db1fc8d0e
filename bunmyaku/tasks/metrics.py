"""The metrics of every fine-tuning task: classification, correlation, entity F1 and SQuAD's EM / F1.

A metric that is undefined on its inputs (the correlation of a constant, the accuracy of nothing) is
``None`` with a logged warning, never a number that looks like a score. Non-finite inputs are an error:
they mean the model failed, and no metric of them means anything.

(``bunmyaku.training.metrics`` is something else: the training log writer.)
"""

from __future__ import annotations

import collections
import logging
import math
import re
import string
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Classification


def accuracy(gold: Sequence[Any], predicted: Sequence[Any]) -> float | None:
    """Share of exact matches (None for no examples)."""
    if len(gold) != len(predicted):
        raise ValueError(f"accuracy: {len(gold)} gold labels but {len(predicted)} predictions")
    if not gold:
        logger.warning("accuracy is undefined without examples")
        return None
    return sum(g == p for g, p in zip(gold, predicted, strict=True)) / len(gold)


def _macro_f1(counts: Iterable[tuple[int, int, int]], what: str) -> float | None:
    """The mean F1 over classes from their (true positive, false positive, false negative) counts, leaving out
    classes absent from gold and predictions alike (their F1 is 0 / 0)."""
    scores = [2 * tp / (2 * tp + fp + fn) for tp, fp, fn in counts if tp + fp + fn]
    if not scores:
        logger.warning("%s is undefined: no class occurs in the gold labels or the predictions", what)
        return None
    return sum(scores) / len(scores)


def macro_f1(gold: Sequence[int], predicted: Sequence[int], num_classes: int) -> float | None:
    """F1 per class averaged over the classes present in gold or predictions (scikit-learn's 'macro' with its
    default labels); None when no class is present."""
    gold_a, pred_a = np.asarray(gold), np.asarray(predicted)
    counts = [
        (
            int(((pred_a == c) & (gold_a == c)).sum()),
            int(((pred_a == c) & (gold_a != c)).sum()),
            int(((pred_a != c) & (gold_a == c)).sum()),
        )
        for c in range(num_classes)
    ]
    return _macro_f1(counts, "macro F1")


def multi_label_f1(gold: Sequence[Sequence[int]], predicted: Sequence[Sequence[int]], num_classes: int) -> float | None:
    """Macro F1 over classes for multi-label examples (each a list of class ids): per class, the F1 of
    "has the class", averaged over the classes present in gold or predictions; None when none is."""
    pairs = [(set(g), set(p)) for g, p in zip(gold, predicted, strict=True)]
    counts = [
        (
            sum(c in g and c in p for g, p in pairs),
            sum(c not in g and c in p for g, p in pairs),
            sum(c in g and c not in p for g, p in pairs),
        )
        for c in range(num_classes)
    ]
    return _macro_f1(counts, "multi-label F1")


# ------------------------------------------------------------------------------------------------
# Regression


def _finite_array(values: Sequence[float], name: str, side: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise ValueError(f"{name}: {bad} of {len(array)} {side} values are not finite (NaN or infinity)")
    return array


def mean_squared_error(gold: Sequence[float], predicted: Sequence[float]) -> float | None:
    """Mean of squared differences (None for no examples)."""
    a = _finite_array(gold, "mse", "gold")
    b = _finite_array(predicted, "mse", "predicted")
    if len(a) == 0:
        logger.warning("mse is undefined without examples")
        return None
    return float(np.mean((a - b) ** 2))


def pearson(x: Sequence[float], y: Sequence[float], name: str = "pearson") -> float | None:
    """Pearson correlation; None (with a warning) when either side is constant, where it is undefined."""
    a, b = _finite_array(x, name, "first"), _finite_array(y, name, "second")
    if len(a) != len(b):
        raise ValueError(f"{name}: {len(a)} values against {len(b)}")
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    if denom == 0.0:
        logger.warning("%s is undefined on %d pairs: one side is constant", name, len(a))
        return None
    return float((a * b).sum() / denom)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (Pearson on tie-averaged ranks); None when either side is constant."""
    a, b = _finite_array(x, "spearman", "first"), _finite_array(y, "spearman", "second")
    return pearson(_ranks(a), _ranks(b), name="spearman")


# ------------------------------------------------------------------------------------------------
# Token classification


def entity_f1(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float | None]:
    """Entity-level precision / recall / F1 over BIO tag sequences: an entity counts when its type, start and end
    all match. Entities are read by ``seqeval`` (as its ``f1_score`` reads them); precision is None without
    predicted entities, recall None without gold ones, F1 None without either (seqeval reports 0.0 there)."""
    try:
        from seqeval.metrics.sequence_labeling import get_entities
    except ImportError as e:  # pragma: no cover - seqeval is in the train and dev extras
        raise ImportError("entity F1 needs seqeval: pip install 'bunmyaku[train]'") from e
    gold_entities = {(i, *e) for i, tags in enumerate(gold) for e in get_entities(tags)}
    predicted_entities = {(i, *e) for i, tags in enumerate(predicted) for e in get_entities(tags)}
    tp = len(gold_entities & predicted_entities)
    n_gold, n_pred = len(gold_entities), len(predicted_entities)
    if not n_pred:
        logger.warning("entity precision is undefined: no entity was predicted")
    if not n_gold:
        logger.warning("entity recall is undefined: the gold tags hold no entity")
    return {
        "precision": tp / n_pred if n_pred else None,
        "recall": tp / n_gold if n_gold else None,
        "f1": 2 * tp / (n_gold + n_pred) if n_gold + n_pred else None,
    }


# ------------------------------------------------------------------------------------------------
# Extractive QA: SQuAD's EM and token F1; character F1 for languages written without spaces


def _has_cjk(text: str) -> bool:
    return any(unicodedata.east_asian_width(ch) in ("W", "F") for ch in text)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and English articles, squeeze whitespace (NFKC first)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation) and unicodedata.category(ch)[0] != "P")
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _answer_tokens(text: str, char_level: bool) -> list[str]:
    normalized = normalize_answer(text)
    return [ch for ch in normalized if not ch.isspace()] if char_level else normalized.split()


def f1_score(prediction: str, gold: str, char_level: bool | None = None) -> float:
    """Token-overlap F1 (character overlap when ``char_level``, by default for CJK text)."""
    char_level = _has_cjk(gold + prediction) if char_level is None else char_level
    pred, ref = _answer_tokens(prediction, char_level), _answer_tokens(gold, char_level)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_metrics(predictions: list[dict[str, Any]], examples: list[Any]) -> dict[str, float | None]:
    """``exact_match`` and ``f1`` in percent, each the max over the gold answers ("" for unanswerable);
    ``examples`` are ``QAExample``s. None for no examples."""
    if not examples:
        logger.warning("exact match and F1 are undefined without questions")
        return {"exact_match": None, "f1": None}
    em = f1 = 0.0
    for pred, example in zip(predictions, examples, strict=True):
        golds = [""] if example.is_impossible or not example.answers else [a["text"] for a in example.answers]
        em += max(exact_match(pred["prediction_text"], g) for g in golds)
        f1 += max(f1_score(pred["prediction_text"], g) for g in golds)
    return {"exact_match": 100.0 * em / len(examples), "f1": 100.0 * f1 / len(examples)}


# ------------------------------------------------------------------------------------------------
# K-fold summaries (cv's and ensemble's fold_metrics.json)


def fold_summary(per_fold: list[dict[str, Any]]) -> dict[str, Any]:
    """Each fold's metrics with their mean and standard deviation (ddof 0) over the folds.

    Args:
        per_fold: one dict per fold, ``{"fold": k, "examples": n, <metric>: value, ...}``, in fold order.

    Returns:
        ``{"folds": per_fold, "mean": {...}, "std": {...}}``; a metric undefined (None or NaN) on a fold is left
        out of its mean and std, and is None there when no fold defines it.
    """
    keys = [key for key in (per_fold[0] if per_fold else {}) if key not in ("fold", "examples")]
    summary: dict[str, Any] = {"folds": per_fold, "mean": {}, "std": {}}
    for key in keys:
        values = [f[key] for f in per_fold if f.get(key) is not None and not math.isnan(f[key])]
        summary["mean"][key] = float(np.mean(values)) if values else None
        summary["std"][key] = float(np.std(values)) if values else None
    return summary
