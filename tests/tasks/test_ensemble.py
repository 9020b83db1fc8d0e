"""bunmyaku ensemble over synthetic cv output folders: validation, mean / rank / weighted / stacking, nesting."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import pearsonr, rankdata

from bunmyaku.tasks.ensemble import ensemble, fit_weights

LABELS = ["neg", "neu", "pos"]


def write_run(path, scores, gold, folds, labels=LABELS, test_scores=None):
    """A cv output folder as the issue's contract gives it: oof.jsonl (one record per row) and metrics.json."""
    path.mkdir(parents=True)
    with open(path / "oof.jsonl", "w") as f:
        for row, (s, g, k) in enumerate(zip(scores, gold, folds, strict=True)):
            if labels is None:  # regression
                record = {"text": f"t{row}", "score": float(s), "gold": float(g), "scores": float(s)}
            else:
                best = int(np.argmax(s))
                record = {"text": f"t{row}", "label": labels[best], "score": float(s[best]), "gold": labels[g]}
                record["scores"] = [float(x) for x in s]
            f.write(json.dumps(record | {"row": row, "fold": int(k)}) + "\n")
    (path / "metrics.json").write_text("{}")
    if test_scores is not None:
        with open(path / "test_predictions.jsonl", "w") as f:
            for row, s in enumerate(test_scores):
                f.write(json.dumps({"row": row, "scores": [float(x) for x in s]}) + "\n")
    return path


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def data(n=300, k=5, seed=0):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 3, n)
    folds = np.arange(n) % k
    return rng, gold, folds


def informative(rng, gold, strength=1.5):
    return softmax(strength * np.eye(3)[gold] + rng.normal(size=(len(gold), 3)))


def noise(rng, n):
    return rng.dirichlet(np.ones(3), n)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_mean_of_identical_runs_equals_the_run(tmp_path):
    rng, gold, folds = data()
    scores = informative(rng, gold)
    test = noise(rng, 7)
    a = write_run(tmp_path / "a", scores, gold, folds, test_scores=test)
    b = write_run(tmp_path / "b", scores, gold, folds, test_scores=test)
    result = ensemble([a, b], tmp_path / "out", method="mean")
    oof = read_jsonl(tmp_path / "out" / "oof.jsonl")
    source = read_jsonl(a / "oof.jsonl")
    assert len(oof) == len(source)
    for mine, theirs in zip(oof, source, strict=True):
        assert mine["label"] == theirs["label"] and mine["gold"] == theirs["gold"]
        assert (mine["row"], mine["fold"], mine["text"]) == (theirs["row"], theirs["fold"], theirs["text"])
        np.testing.assert_allclose(mine["scores"], theirs["scores"], rtol=1e-12)
    expected_accuracy = float(np.mean(scores.argmax(1) == gold))
    assert result.metrics["accuracy"] == pytest.approx(expected_accuracy)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["accuracy"] == pytest.approx(expected_accuracy) and "f1" in written
    test_out = read_jsonl(tmp_path / "out" / "test_predictions.jsonl")
    np.testing.assert_allclose([r["scores"] for r in test_out], test, rtol=1e-12)
    assert [r["label"] for r in test_out] == [LABELS[i] for i in test.argmax(1)]
    report = (tmp_path / "out" / "report.md").read_text()
    assert str(a) in report and "ensemble (mean)" in report


def test_mean_and_rank_against_numpy(tmp_path):
    rng, gold, folds = data()
    s1, s2 = informative(rng, gold), informative(rng, gold, 0.5)
    runs = [write_run(tmp_path / "a", s1, gold, folds), write_run(tmp_path / "b", s2, gold, folds)]
    mean = ensemble(runs, tmp_path / "mean", method="mean")
    np.testing.assert_allclose(mean.oof_scores, (s1 + s2) / 2)
    rank = ensemble(runs, tmp_path / "rank", method="rank")
    expected = (rankdata(s1, axis=0) + rankdata(s2, axis=0)) / (2 * len(gold))
    np.testing.assert_allclose(rank.oof_scores, expected)
    assert rank.metrics["accuracy"] == pytest.approx(float(np.mean(expected.argmax(1) == gold)))


def test_mismatched_runs_are_refused(tmp_path):
    rng, gold, folds = data(n=40)
    scores = informative(rng, gold)
    a = write_run(tmp_path / "a", scores, gold, folds)
    other_folds = folds.copy()
    other_folds[[7, 8]] = other_folds[[8, 7]]
    b = write_run(tmp_path / "folds", scores, gold, other_folds)
    with pytest.raises(ValueError, match=r"do not share the folds: row 7 is in fold 2 vs 3"):
        ensemble([a, b], tmp_path / "out")
    other_gold = gold.copy()
    other_gold[11] = (gold[11] + 1) % 3
    c = write_run(tmp_path / "gold", scores, other_gold, folds)
    with pytest.raises(ValueError, match=r"do not share the gold labels: row 11 has gold"):
        ensemble([a, c], tmp_path / "out")
    d = write_run(tmp_path / "rows", scores[:-1], gold[:-1], folds[:-1])
    with pytest.raises(ValueError, match=r"do not share the training rows .*: 39\)"):
        ensemble([a, d], tmp_path / "out")
    e = write_run(tmp_path / "labels", scores, gold, folds, labels=["x", "y", "z"])
    with pytest.raises(ValueError, match="do not share the label set"):
        ensemble([a, e], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_are_on_the_simplex_and_noise_gets_none(tmp_path):
    rng, gold, folds = data(n=600)
    good, weaker, pure_noise = informative(rng, gold, 2.0), informative(rng, gold, 1.0), noise(rng, 600)
    runs = [
        write_run(tmp_path / "good", good, gold, folds),
        write_run(tmp_path / "weaker", weaker, gold, folds),
        write_run(tmp_path / "noise", pure_noise, gold, folds),
    ]
    result = ensemble(runs, tmp_path / "out", method="weighted")
    weights = np.array([result.weights[str(r)] for r in runs])
    assert (weights >= 0).all() and weights.sum() == pytest.approx(1.0)
    assert weights[2] < 0.02 and weights[0] > weights[1]
    # the fit really is the minimum of the log-loss on the simplex: no grid point does better
    stack = np.stack([good, weaker, pure_noise])

    def loss(w):
        return -np.mean(np.log(np.tensordot(w, stack, axes=1)[np.arange(600), gold]))

    grid = [np.array([a, b, 1 - a - b]) for a in np.linspace(0, 1, 21) for b in np.linspace(0, 1 - a, 21)]
    assert loss(weights) <= min(loss(w) for w in grid) + 1e-6
    assert "noise" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("method", ["weighted", "stacking"])
def test_nested_fit_never_sees_the_held_out_fold(tmp_path, method):
    """Leak detector: a run that is the gold label on fold 0 and noise elsewhere. Fitted on all folds it earns a
    large weight (its log-loss on fold 0 is ~0), which would make fold 0's predictions near perfect; nested, fold
    0's predictions come from a fit on folds 1..4 where it is noise, so fold 0 is no better than without it, nor
    are the other folds."""
    rng, gold, folds = data(n=500)
    good = informative(rng, gold, 1.0)
    leaky = noise(rng, 500)
    leaky[folds == 0] = 0.98 * np.eye(3)[gold[folds == 0]] + 0.01
    a = write_run(tmp_path / "good", good, gold, folds)
    b = write_run(tmp_path / "leaky", leaky, gold, folds)
    alone = ensemble([a, a], tmp_path / "alone", method=method)
    both = ensemble([a, b], tmp_path / "both", method=method)
    full_fit_leak = both.weights[str(b)]
    assert np.abs(full_fit_leak).max() > 0.1  # the all-folds fit does lean on the leak: the detector can fire
    both_folds, alone_folds = both.fold_metrics["folds"], alone.fold_metrics["folds"]
    assert both_folds[0]["accuracy"] <= alone_folds[0]["accuracy"] + 0.05
    assert both_folds[0]["accuracy"] < 0.9
    for k in range(1, 5):
        assert both_folds[k]["accuracy"] <= alone_folds[k]["accuracy"] + 0.05


def test_stacking_classification_is_out_of_fold(tmp_path):
    rng, gold, folds = data(n=400)
    s1, s2 = informative(rng, gold, 1.0), informative(rng, gold, 1.0)
    runs = [write_run(tmp_path / "a", s1, gold, folds), write_run(tmp_path / "b", s2, gold, folds)]
    result = ensemble(runs, tmp_path / "out", method="stacking")
    from sklearn.linear_model import LogisticRegression

    features = np.log(np.concatenate([s1, s2], axis=1))  # the meta model sees log-probabilities
    expected = np.zeros((400, 3))
    for k in range(5):
        model = LogisticRegression(max_iter=1000).fit(features[folds != k], gold[folds != k])
        expected[folds == k] = model.predict_proba(features[folds == k])
    np.testing.assert_allclose(result.oof_scores, expected, atol=1e-6)
    assert result.metrics["accuracy"] >= max(np.mean(s1.argmax(1) == gold), np.mean(s2.argmax(1) == gold)) - 0.02


def test_regression_with_ridge(tmp_path):
    rng = np.random.default_rng(3)
    n = 300
    gold = rng.normal(size=n)
    folds = np.arange(n) % 5
    s1 = gold + rng.normal(scale=0.5, size=n)
    s2 = 2.0 * gold + rng.normal(scale=1.0, size=n) + 3.0
    runs = [
        write_run(tmp_path / "a", s1, gold, folds, labels=None),
        write_run(tmp_path / "b", s2, gold, folds, labels=None),
    ]
    with pytest.raises(ValueError, match="--meta logistic is for classification"):
        ensemble(runs, tmp_path / "bad", method="stacking", meta="logistic")
    result = ensemble(runs, tmp_path / "out", method="stacking", meta="ridge")
    from sklearn.linear_model import Ridge

    features = np.stack([s1, s2], axis=1)
    expected = np.zeros(n)
    for k in range(5):
        model = Ridge(alpha=1.0).fit(features[folds != k], gold[folds != k])
        expected[folds == k] = model.predict(features[folds == k])
    np.testing.assert_allclose(result.oof_scores[:, 0], expected, atol=1e-9)
    assert result.metrics["pearson"] == pytest.approx(pearsonr(gold, expected)[0])
    assert result.metrics["pearson"] > pearsonr(gold, s1)[0]
    oof = read_jsonl(tmp_path / "out" / "oof.jsonl")
    assert oof[0]["scores"] == pytest.approx(expected[0]) and oof[0]["score"] == pytest.approx(expected[0])
    assert set(json.loads((tmp_path / "out" / "metrics.json").read_text())) == {"pearson", "spearman", "mse"}
    weighted = ensemble(runs, tmp_path / "w", method="weighted")
    w = np.array(list(weighted.weights.values()))
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0)


def test_fit_weights_single_run():
    stack = np.full((1, 4, 2), 0.5)
    np.testing.assert_array_equal(fit_weights(stack, np.array([0, 1, 0, 1]), regression=False), [1.0])


def test_cli(tmp_path):
    rng, gold, folds = data(n=100)
    a = write_run(tmp_path / "a", informative(rng, gold), gold, folds)
    b = write_run(tmp_path / "b", informative(rng, gold), gold, folds)
    command = [sys.executable, "-m", "bunmyaku", "ensemble", "--method", "weighted", "--output-dir"]
    done = subprocess.run([*command, str(tmp_path / "out"), str(a), str(b)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "accuracy" in done.stdout and "per fold: accuracy" in done.stdout
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["accuracy"] > 0.5
    bad = write_run(tmp_path / "c", informative(rng, gold)[:-1], gold[:-1], folds[:-1])
    done = subprocess.run([*command, str(tmp_path / "out2"), str(a), str(bad)], capture_output=True, text=True)
    assert done.returncode == 1 and "error:" in done.stderr and "do not share the training rows" in done.stderr
    assert "Traceback" not in done.stderr


def test_test_predictions_use_the_weights_fitted_on_all_folds(tmp_path):
    rng, gold, folds = data(n=300)
    s1, s2 = informative(rng, gold, 1.2), informative(rng, gold, 1.2)
    t1, t2 = noise(rng, 9), noise(rng, 9)
    runs = [
        write_run(tmp_path / "a", s1, gold, folds, test_scores=t1),
        write_run(tmp_path / "b", s2, gold, folds, test_scores=t2),
    ]
    result = ensemble(runs, tmp_path / "out", method="weighted")
    w = [result.weights[str(r)] for r in runs]
    assert 0.1 < w[0] < 0.9
    test = read_jsonl(tmp_path / "out" / "test_predictions.jsonl")
    assert [r["row"] for r in test] == list(range(9))
    np.testing.assert_allclose([r["scores"] for r in test], w[0] * t1 + w[1] * t2, rtol=1e-9)
    # the nested out-of-fold scores differ from the all-folds mix (each fold has its own fit)
    assert not np.allclose(result.oof_scores, w[0] * s1 + w[1] * s2, rtol=0, atol=1e-9)
    # a run without test predictions: none written; runs with different test rows: refused
    c = write_run(tmp_path / "c", s2, gold, folds)
    ensemble([runs[0], c], tmp_path / "no_test", method="mean")
    assert not (tmp_path / "no_test" / "test_predictions.jsonl").exists()
    d = write_run(tmp_path / "d", s2, gold, folds, test_scores=t2[:-1])
    with pytest.raises(ValueError, match="do not share the test rows"):
        ensemble([runs[0], d], tmp_path / "bad", method="mean")


def test_labels_from_the_fold_model_and_integer_gold(tmp_path):
    """Gold labels written as integers match the label names "0", "1", "2"; classes no run ever predicts are
    named by the fold model's config.json."""
    rng, gold, folds = data(n=60)
    scores = informative(rng, gold, 3.0)
    scores[:, 1:] = 0.0  # classes 1 and 2 are never the prediction
    path = write_run(tmp_path / "a", scores, gold, folds, labels=["0", "1", "2"])
    records = read_jsonl(path / "oof.jsonl")
    with open(path / "oof.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record | {"gold": int(record["gold"])}) + "\n")
    with pytest.raises(ValueError, match=r"cannot tell the label of class\(es\) \[1, 2\]"):
        ensemble([path], tmp_path / "out")
    (path / "fold0" / "model").mkdir(parents=True)
    (path / "fold0" / "model" / "config.json").write_text(json.dumps({"id2label": {"0": "0", "1": "1", "2": "2"}}))
    result = ensemble([path], tmp_path / "out")
    predicted = scores.argmax(1)
    assert result.metrics["accuracy"] == pytest.approx(float(np.mean(predicted == gold)))
    assert {r["label"] for r in read_jsonl(tmp_path / "out" / "oof.jsonl")} == {"0"}


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_outputs_have_the_format_of_a_real_cv_run(tmp_path, kind):
    """ensemble writes what cv writes: the same oof.jsonl record keys, metrics.json keys and fold_metrics.json
    layout; a mean of one run reproduces that run's cv numbers (cv computes them with the task's own metrics)."""
    import bunmyaku
    from tests.finetune.helpers import save_tiny, sentiment_rows

    model = save_tiny(tmp_path / "tiny", "bert")
    options = {"epochs": 1, "batch_size": 4, "max_length": 16, "progress": False, "plot": False, "device": "cpu"}
    if kind == "classification":
        train = [{"text": t, "label": lab} for t, lab in sentiment_rows(8)]
    else:
        train = [{"a": t, "b": "nice film", "score": 5.0 * (lab == "pos")} for t, lab in sentiment_rows(8)]
        options |= {"task": "sentence-similarity", "text_column": "a", "text_pair_column": "b", "label_column": "score"}
    cv = tmp_path / "cv"
    bunmyaku.cv(model=str(model), train=train, folds=2, output_dir=str(cv), **options)
    reference_oof = read_jsonl(cv / "oof.jsonl")
    reference_metrics = json.loads((cv / "metrics.json").read_text())
    reference_folds = json.loads((cv / "fold_metrics.json").read_text())
    for method, runs in (("mean", [cv]), ("stacking", [cv, cv])):
        out = tmp_path / method
        result = ensemble(runs, out, method=method)
        oof = read_jsonl(out / "oof.jsonl")
        assert [set(r) for r in oof] == [set(r) for r in reference_oof]
        same = [(r["row"], r["fold"], r["gold"]) for r in reference_oof]
        assert [(r["row"], r["fold"], r["gold"]) for r in oof] == same
        metrics = json.loads((out / "metrics.json").read_text())
        assert list(metrics) == list(reference_metrics)
        folds = json.loads((out / "fold_metrics.json").read_text())
        assert folds == result.fold_metrics
        assert list(folds) == ["folds", "mean", "std"] and list(folds["mean"]) == list(reference_folds["mean"])
        assert [list(f) for f in folds["folds"]] == [list(f) for f in reference_folds["folds"]]
        assert [(f["fold"], f["examples"]) for f in folds["folds"]] == [
            (f["fold"], f["examples"]) for f in reference_folds["folds"]
        ]
        if method == "mean":  # the run itself: the same predictions and numbers as cv wrote
            assert [r.get("label") for r in oof] == [r.get("label") for r in reference_oof]
            np.testing.assert_allclose([r["scores"] for r in oof], [r["scores"] for r in reference_oof], rtol=1e-9)
            assert metrics == pytest.approx(reference_metrics, rel=1e-9, nan_ok=False)
            for mine, theirs in zip(folds["folds"], reference_folds["folds"], strict=True):
                assert mine == pytest.approx(theirs, rel=1e-9)
            for stat in ("mean", "std"):
                assert folds[stat] == pytest.approx(reference_folds[stat], rel=1e-9)


def test_stacking_on_near_uniform_probabilities_beats_each_run(tmp_path):
    """BENCHMARKS.md measured stacking on two undertrained runs (4 classes, probabilities about 0.15-0.4) worse than
    either run: a logistic regression on the probabilities fell back on the class priors. Here is that situation
    at test size; on log-probabilities the meta model must do better than the better run."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    n, k, classes = 240, 5, 4
    gold, folds = rng.integers(0, classes, n), np.arange(n) % k
    s1, s2 = (softmax(0.12 * (1.5 * np.eye(classes)[gold] + rng.normal(size=(n, classes)))) for _ in range(2))
    assert 0.1 < min(s1.min(), s2.min()) and max(s1.max(), s2.max()) < 0.45  # near uniform, as measured
    names = ["a", "b", "c", "d"]
    runs = [write_run(tmp_path / n_, s, gold, folds, labels=names) for n_, s in (("r1", s1), ("r2", s2))]
    best_run = max(np.mean(s1.argmax(1) == gold), np.mean(s2.argmax(1) == gold))
    # the measured failure, reproduced: the same nested fit on the probabilities is worse than either run
    features = np.concatenate([s1, s2], axis=1)
    on_probabilities = np.zeros(n, dtype=int)
    for fold in range(k):
        model = LogisticRegression(max_iter=1000).fit(features[folds != fold], gold[folds != fold])
        on_probabilities[folds == fold] = model.predict(features[folds == fold])
    assert np.mean(on_probabilities == gold) < min(np.mean(s1.argmax(1) == gold), np.mean(s2.argmax(1) == gold))
    stacked = ensemble(runs, tmp_path / "stacking", method="stacking")
    mean = ensemble(runs, tmp_path / "mean", method="mean")
    assert stacked.metrics["accuracy"] > best_run + 0.05
    assert stacked.metrics["accuracy"] >= mean.metrics["accuracy"] - 0.03
