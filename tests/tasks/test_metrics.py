"""Task metrics against independent oracles (numpy, scipy, scikit-learn), and honest None where undefined."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from bunmyaku.tasks.metrics import (
    accuracy,
    entity_f1,
    macro_f1,
    mean_squared_error,
    multi_label_f1,
    pearson,
    spearman,
)
from tests.conftest import require_module

stats = require_module("scipy.stats")
sk_metrics = require_module("sklearn.metrics")


def test_pearson_matches_numpy_and_scipy():
    x, y = [1, 2, 3], [2, 4, 6.5]
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12, abs=0)
    assert pearson(x, y) == pytest.approx(4.5 / np.sqrt(2 * 61 / 6), rel=1e-12, abs=0)  # by hand: cov / (sx sy)
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    b = 0.3 * a + rng.normal(size=50)
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b).statistic, rel=1e-12, abs=0)


def test_spearman_with_ties_matches_scipy():
    x, y = [1, 2, 3, 4], [10, 20, 20, 40]
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, rel=1e-12, abs=0)
    rng = np.random.default_rng(1)
    a = rng.integers(0, 6, size=60).astype(float)  # many ties on both sides
    b = a + rng.integers(0, 4, size=60)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, rel=1e-12, abs=0)


@pytest.mark.parametrize("metric", [pearson, spearman])
def test_correlation_of_a_constant_is_undefined_not_zero(metric, caplog):
    with caplog.at_level(logging.WARNING, logger="bunmyaku.tasks.metrics"):
        assert metric([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]) is None
    assert "undefined" in caplog.text and "constant" in caplog.text
    with pytest.warns(stats.ConstantInputWarning):  # the oracle agrees: there is no value
        assert np.isnan(stats.pearsonr([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]).statistic)


@pytest.mark.parametrize("metric", [pearson, spearman, mean_squared_error])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_an_error(metric, bad):
    with pytest.raises(ValueError, match="not finite"):
        metric([1.0, 2.0, 3.0], [0.1, bad, 0.3])


def test_classification_metrics_match_scikit_learn():
    rng = np.random.default_rng(2)
    gold = rng.integers(0, 4, size=40).tolist()
    predicted = [g if rng.random() < 0.6 else int(rng.integers(0, 5)) for g in gold]  # class 4 only predicted
    assert accuracy(gold, predicted) == pytest.approx(sk_metrics.accuracy_score(gold, predicted), rel=1e-12)
    expected = sk_metrics.f1_score(gold, predicted, average="macro")
    assert macro_f1(gold, predicted, num_classes=6) == pytest.approx(expected, rel=1e-12)  # class 5: absent
    assert mean_squared_error([1.0, 2.0, 4.0], [1.5, 2.0, 3.0]) == pytest.approx(
        sk_metrics.mean_squared_error([1.0, 2.0, 4.0], [1.5, 2.0, 3.0]), rel=1e-12
    )


def test_multi_label_f1_matches_scikit_learn():
    rng = np.random.default_rng(3)
    num = 5
    gold_m = rng.random((30, num)) < 0.4
    pred_m = gold_m ^ (rng.random((30, num)) < 0.25)
    gold_m[:, 4] = pred_m[:, 4] = False  # a class nobody has: left out, as in the single-label macro F1
    gold = [np.flatnonzero(row).tolist() for row in gold_m]
    predicted = [np.flatnonzero(row).tolist() for row in pred_m]
    expected = sk_metrics.f1_score(gold_m, pred_m, average="macro", labels=[0, 1, 2, 3])
    assert multi_label_f1(gold, predicted, num) == pytest.approx(expected, rel=1e-12)


def test_metrics_of_nothing_are_undefined(caplog):
    with caplog.at_level(logging.WARNING, logger="bunmyaku.tasks.metrics"):
        assert accuracy([], []) is None
        assert macro_f1([], [], 3) is None
        assert multi_label_f1([[]], [[]], 3) is None
    assert caplog.text.count("undefined") == 3


def test_entity_f1_matches_seqeval_where_defined():
    seqeval = require_module("seqeval.metrics")
    rng = np.random.default_rng(4)
    tags = ["O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    for _ in range(30):
        gold = [[str(rng.choice(tags)) for _ in range(int(rng.integers(1, 9)))] for _ in range(5)]
        predicted = [[t if rng.random() < 0.7 else str(rng.choice(tags)) for t in sentence] for sentence in gold]
        ours = entity_f1(gold, predicted)
        if ours["precision"] is None or ours["recall"] is None:
            continue
        assert ours["precision"] == pytest.approx(seqeval.precision_score(gold, predicted), rel=1e-12, abs=1e-15)
        assert ours["recall"] == pytest.approx(seqeval.recall_score(gold, predicted), rel=1e-12, abs=1e-15)
        assert ours["f1"] == pytest.approx(seqeval.f1_score(gold, predicted), rel=1e-12, abs=1e-15)
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    assert entity_f1(gold, [["B-PER", "O", "O", "B-LOC"]]) == {"precision": 0.5, "recall": 0.5, "f1": 0.5}  # by hand


def test_entity_scores_without_entities_are_undefined(caplog):
    with caplog.at_level(logging.WARNING, logger="bunmyaku.tasks.metrics"):
        none_predicted = entity_f1([["B-PER", "O"]], [["O", "O"]])
        none_at_all = entity_f1([["O", "O"]], [["O", "O"]])
    assert none_predicted == {"precision": None, "recall": 0.0, "f1": 0.0}  # F1 = 2TP / (gold + predicted) = 0 / 1
    assert none_at_all == {"precision": None, "recall": None, "f1": None}
    assert "no entity was predicted" in caplog.text and "gold tags hold no entity" in caplog.text
