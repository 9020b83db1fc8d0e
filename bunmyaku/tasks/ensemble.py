"""Ensembles of ``bunmyaku cv`` runs: probability mean, rank mean, fitted weights, stacking.

Each input folder is a ``cv`` output: ``RUN/oof.jsonl`` (one record per training example, with ``row``, ``fold``,
``gold`` and ``scores``: the probability of every class in ``id2label`` order, or the regression value) and,
optionally, ``RUN/test_predictions.jsonl`` (``row`` and averaged ``scores`` per test example). The runs must
share the training file and the folds: the same rows, the same gold label and the same fold per row.

Multiple choice (classification over the choices) and bi-encoder similarity (a value, as regression) take every
method. Token classification and QA scores are not one vector per row (tag probabilities per word or character,
n-best answer spans): they take ``mean`` only, averaged and decoded as ``cv`` averages its seeds
(:mod:`bunmyaku.tasks.averaging`). A run's family comes from its ``cv.json``.

Every score the ensemble reports is out of fold. ``weighted`` and ``stacking`` fit their weights or their
second-stage model once per fold on the other K-1 folds and predict the held-out fold with it (nested), so the
ensemble's out-of-fold metric is comparable to the single runs'. The weights in ``report.md`` and the test
predictions come from one more fit on all folds. The output folder::

    OUT/oof.jsonl                 the ensemble's out-of-fold predictions, in the format of cv's oof.jsonl
    OUT/metrics.json              their metrics (accuracy and macro f1, or pearson, spearman and mse)
    OUT/fold_metrics.json         the metrics on each held-out fold, and their mean and std (as cv writes it)
    OUT/test_predictions.jsonl    when every run has test predictions
    OUT/report.md                 each run's out-of-fold metrics beside the ensemble's, and the fitted weights
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bunmyaku.data.tables import iter_jsonl
from bunmyaku.hub.files import write_json_atomic, write_jsonl_atomic, write_text_atomic
from bunmyaku.tasks import averaging
from bunmyaku.tasks.metrics import accuracy, fold_summary, macro_f1, mean_squared_error, pearson, spearman

logger = logging.getLogger(__name__)

METHODS = ("mean", "weighted", "rank", "stacking")
METAS = ("logistic", "ridge")
_EPS = 1e-12
_LOG_FLOOR = 1e-7  # stacking's log-probability features: log(max(p, 1e-7)) keeps a 0 probability finite


@dataclass
class CvRun:
    """One ``cv`` output folder, read: arrays indexed by position after sorting by ``row``."""

    path: Path
    rows: np.ndarray  # (N,) training-file row indices, ascending
    folds: np.ndarray  # (N,) fold of each row
    gold: list[Any]  # (N,) gold labels as the data gives them
    scores: np.ndarray  # (N, C) class probabilities, or (N, 1) regression values
    records: list[dict[str, Any]]  # the oof.jsonl records, sorted by row
    label_of_index: dict[int, Any]  # class index -> label name, as far as the records show it
    regression: bool
    test_rows: np.ndarray | None = None
    test_scores: np.ndarray | None = None


@dataclass
class EnsembleResult:
    """What :func:`ensemble` computed (and wrote)."""

    method: str
    metrics: dict[str, float | None]  # the ensemble's out-of-fold metrics
    run_metrics: dict[str, dict[str, float | None]]  # each input run's out-of-fold metrics
    fold_metrics: dict[str, Any]  # fold_metrics.json: {"folds": [{"fold", "examples", metrics...}], "mean", "std"}
    weights: dict[str, Any] = field(default_factory=dict)  # fitted on all folds (weighted / stacking)
    oof_scores: np.ndarray | None = None  # (N, C) or (N, 1)


# ------------------------------------------------------------------------------------------------
# Reading and validation


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = [record for _, record in iter_jsonl(path)]  # the one JSONL reader: DataError naming file and line
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _scores_matrix(records: list[dict[str, Any]], path: Path) -> tuple[np.ndarray, bool]:
    """(N, C) probabilities, or (N, 1) values for regression, from each record's ``scores``."""
    first = records[0].get("scores")
    regression = not isinstance(first, list)
    rows = []
    for number, record in enumerate(records, start=1):
        value = record.get("scores")
        if value is None:
            raise ValueError(f"{path}: record {number} has no 'scores' (is this a bunmyaku cv output?)")
        if isinstance(value, list) == regression:
            raise ValueError(f"{path}: record {number}: 'scores' mixes class lists and single values")
        row = [value] if regression else value
        if not regression and len(row) != len(first):
            raise ValueError(f"{path}: record {number} has {len(row)} class scores, the first record {len(first)}")
        rows.append(row)
    try:
        matrix = np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: 'scores' must hold numbers") from None
    if not np.isfinite(matrix).all():
        bad = int(np.argwhere(~np.isfinite(matrix))[0][0]) + 1
        raise ValueError(f"{path}: record {bad} has a NaN or infinite score")
    return matrix, regression


def _sorted_by_row(records: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    for number, record in enumerate(records, start=1):
        if not isinstance(record.get("row"), int) or record["row"] < 0:
            raise ValueError(f"{path}: record {number} has no non-negative integer 'row'")
    ordered = sorted(records, key=lambda r: r["row"])
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a["row"] == b["row"]:
            raise ValueError(f"{path}: row {a['row']} appears twice")
    return ordered


def _config_labels(run_dir: Path) -> dict[int, Any]:
    """``id2label`` of the first fold model, when the folder holds one (cv writes ``DIR/fold{k}/model/``)."""
    for config in sorted(run_dir.glob("fold*/model/config.json")):
        try:
            id2label = json.loads(config.read_text(encoding="utf-8")).get("id2label") or {}
            return {int(k): v for k, v in id2label.items()}
        except (ValueError, AttributeError):
            return {}
    return {}


def load_cv_run(run_dir: str | os.PathLike) -> CvRun:
    """Read one ``cv`` output folder (``oof.jsonl``, and ``test_predictions.jsonl`` when present).

    Raises:
        FileNotFoundError: the folder or its ``oof.jsonl`` does not exist.
        ValueError: a record lacks ``row``, ``fold``, ``gold`` or ``scores``, or a row appears twice.
    """
    path = Path(run_dir)
    oof = path / "oof.jsonl"
    if not oof.is_file():
        raise FileNotFoundError(f"{oof}: no such file (ensemble needs bunmyaku cv output folders)")
    records = _sorted_by_row(_read_jsonl(oof), oof)
    for record in records:
        for key in ("fold", "gold"):
            if key not in record:
                raise ValueError(f"{oof}: row {record['row']} has no '{key}'")
    scores, regression = _scores_matrix(records, oof)
    label_of_index = {} if regression else _config_labels(path)
    if not regression:
        for record, row in zip(records, scores, strict=True):
            if "label" in record:  # the prediction is the most probable class: it names that index
                label_of_index.setdefault(int(np.argmax(row)), record["label"])
    run = CvRun(
        path=path,
        rows=np.asarray([r["row"] for r in records]),
        folds=np.asarray([r["fold"] for r in records]),
        gold=[r["gold"] for r in records],
        scores=scores,
        records=records,
        label_of_index=label_of_index,
        regression=regression,
    )
    test = path / "test_predictions.jsonl"
    if test.is_file():
        test_records = _sorted_by_row(_read_jsonl(test), test)
        test_scores, test_regression = _scores_matrix(test_records, test)
        if test_regression != regression or test_scores.shape[1] != scores.shape[1]:
            raise ValueError(f"{test}: its scores do not have the shape of {oof}'s")
        run.test_rows = np.asarray([r["row"] for r in test_records])
        run.test_scores = test_scores
    return run


def _first_difference(a: np.ndarray | list, b: np.ndarray | list) -> int:
    """The first position where ``a`` and ``b`` (of the same length) differ, or -1."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), -1)


def check_compatible(runs: list[CvRun]) -> None:
    """Refuse runs that do not share rows, gold labels, folds and label set.

    Raises:
        ValueError: naming the two runs and the first row where they differ.
    """
    if not runs:
        raise ValueError("ensemble needs at least one run folder")
    base = runs[0]
    for run in runs[1:]:
        pair = f"{base.path} and {run.path}"
        if not np.array_equal(base.rows, run.rows):
            missing = sorted(set(base.rows.tolist()) ^ set(run.rows.tolist()))
            raise ValueError(
                f"{pair} do not share the training rows (first row in one but not the other: {missing[0]}); "
                "ensemble runs of the same training file"
            )
        if run.regression != base.regression or run.scores.shape[1] != base.scores.shape[1]:
            kind = {True: "regression", False: "classification"}
            raise ValueError(
                f"{pair} do not share the label set: {kind[base.regression]} with {base.scores.shape[1]} "
                f"score(s) per row vs {kind[run.regression]} with {run.scores.shape[1]}"
            )
        for index, name in run.label_of_index.items():
            if base.label_of_index.get(index, name) != name:
                raise ValueError(
                    f"{pair} do not share the label set: class {index} is {base.label_of_index[index]!r} in one "
                    f"and {name!r} in the other"
                )
        i = _first_difference(base.gold, run.gold)
        if i >= 0:
            raise ValueError(
                f"{pair} do not share the gold labels: row {base.rows[i]} has gold {base.gold[i]!r} vs {run.gold[i]!r}"
            )
        i = _first_difference(base.folds.tolist(), run.folds.tolist())
        if i >= 0:
            raise ValueError(
                f"{pair} do not share the folds: row {base.rows[i]} is in fold {base.folds[i]} vs {run.folds[i]} "
                "(run cv with the same --folds, --fold-seed and --group-column)"
            )
        if (base.test_scores is None) != (run.test_scores is None):
            continue  # test predictions are then left out (logged by the caller)
        if base.test_rows is not None and not np.array_equal(base.test_rows, run.test_rows):
            raise ValueError(f"{pair} do not share the test rows (test_predictions.jsonl)")


def _class_names(runs: list[CvRun]) -> list[Any]:
    """Class index -> label name, merged over the runs; a class no run ever predicted takes the one gold label
    left without an index."""
    num = runs[0].scores.shape[1]
    names: dict[int, Any] = {}
    for run in runs:
        for index, name in run.label_of_index.items():
            names.setdefault(index, name)
    unnamed = [i for i in range(num) if i not in names]
    named = {str(n) for n in names.values()}
    leftover = {str(g): g for g in runs[0].gold if str(g) not in named}
    if len(unnamed) == 1 and len(leftover) == 1:
        names[unnamed[0]] = next(iter(leftover.values()))
        unnamed = []
    if unnamed:
        raise ValueError(
            f"{runs[0].path}: cannot tell the label of class(es) {unnamed}: no run predicts them and no "
            "fold*/model/config.json gives id2label"
        )
    return [names[i] for i in range(num)]


# ------------------------------------------------------------------------------------------------
# Combining


def _ranks(stack: np.ndarray) -> np.ndarray:
    """(R, N, C) scores -> ranks per run and column, scaled to (0, 1]."""
    from scipy.stats import rankdata

    return rankdata(stack, axis=1) / stack.shape[1]


def _mix(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(R, N, C) scores, (R,) weights -> (N, C)."""
    return np.tensordot(weights, stack, axes=1)


def _loss(mixed: np.ndarray, target: np.ndarray, regression: bool) -> float:
    if regression:
        return float(np.mean((mixed[:, 0] - target) ** 2))
    return float(-np.mean(np.log(np.clip(mixed[np.arange(len(target)), target], _EPS, None))))


def fit_weights(stack: np.ndarray, target: np.ndarray, regression: bool) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the log-loss (classification) or the mean squared error
    (regression) of the weighted score average, by SLSQP on the simplex.

    Args:
        stack: (R, N, C) the runs' scores.
        target: (N,) class indices, or values.

    Returns:
        (R,) weights.
    """
    from scipy.optimize import minimize

    count = stack.shape[0]
    start = np.full(count, 1.0 / count)
    if count == 1:
        return start
    result = minimize(
        lambda w: _loss(_mix(stack, w), target, regression),
        start,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * count,
        constraints=[{"type": "eq", "fun": lambda w: np.sum(w) - 1.0}],
        options={"maxiter": 500, "ftol": 1e-10},
    )
    weights = np.clip(result.x, 0.0, None)
    return weights / weights.sum()


def _meta_features(stack: np.ndarray, regression: bool) -> np.ndarray:
    """(R, N, C) -> (N, R * C): the runs' scores side by side; for classification their log-probabilities.

    Log-probabilities are the runs' logits up to a constant per row, so a linear model reproduces any one run
    (softmax(log p) = p) or their geometric mean with small coefficients. On probabilities it cannot: near-uniform
    ones (an undertrained run) differ by a few hundredths, and the regularised fit falls back on the class
    priors; saturated ones squeeze every confident row to the same 0 / 1.
    """
    features = np.concatenate(list(stack), axis=1)
    return features if regression else np.log(np.maximum(features, _LOG_FLOOR))


def fit_meta(stack: np.ndarray, target: np.ndarray, regression: bool, meta: str, num_classes: int):
    """A scikit-learn second-stage model on the runs' scores: logistic regression on their log-probabilities
    (classification) or ridge regression on their values (regression)."""
    if meta == "logistic":
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(max_iter=1000)
    else:
        from sklearn.linear_model import Ridge

        model = Ridge(alpha=1.0)
    return model.fit(_meta_features(stack, regression), target)


def predict_meta(model, stack: np.ndarray, regression: bool, num_classes: int) -> np.ndarray:
    features = _meta_features(stack, regression)
    if regression:
        return model.predict(features)[:, None]
    probabilities = np.zeros((features.shape[0], num_classes))
    probabilities[:, model.classes_] = model.predict_proba(features)  # a class absent from the fit stays at 0
    return probabilities


def _fit_predict(method, train, target, apply, regression, meta, num_classes):
    """Fit on ``train`` (R, n, C) with ``target`` and return (fitted parameters, predictions for each of
    ``apply``)."""
    if method == "weighted":
        weights = fit_weights(train, target, regression)
        return weights, [_mix(s, weights) for s in apply]
    model = fit_meta(train, target, regression, meta, num_classes)
    return model, [predict_meta(model, s, regression, num_classes) for s in apply]


def combine(
    stack: np.ndarray,
    folds: np.ndarray,
    target: np.ndarray,
    method: str,
    regression: bool,
    meta: str | None = None,
    test_stack: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, Any]:
    """The ensemble's out-of-fold scores (nested for the fitted methods), its test scores, and the parameters
    fitted on all folds.

    Args:
        stack: (R, N, C) the runs' out-of-fold scores.
        folds: (N,) each row's fold.
        target: (N,) gold class indices, or values.
        test_stack: (R, M, C) the runs' test scores, or None.

    Returns:
        ((N, C) out-of-fold scores, (M, C) test scores or None, weights (R,) / the meta model / None).
    """
    if method == "mean":  # the same averaging as cv's seeds and folds
        kind = "value" if regression else "probabilities"
        test = None if test_stack is None else np.asarray(averaging.average(kind, test_stack))
        return np.asarray(averaging.average(kind, stack)), test, None
    if method == "rank":
        test = None if test_stack is None else _ranks(test_stack).mean(axis=0)
        return _ranks(stack).mean(axis=0), test, None
    num_classes = stack.shape[2]
    oof = np.zeros(stack.shape[1:])
    for fold in np.unique(folds):
        held_out = folds == fold
        # fitted on the other folds only: the held-out fold's labels never reach its own predictions
        _, (predicted,) = _fit_predict(
            method, stack[:, ~held_out], target[~held_out], [stack[:, held_out]], regression, meta, num_classes
        )
        oof[held_out] = predicted
    apply = [] if test_stack is None else [test_stack]
    fitted, predicted = _fit_predict(method, stack, target, apply, regression, meta, num_classes)
    return oof, (predicted[0] if predicted else None), fitted


# ------------------------------------------------------------------------------------------------
# Metrics and outputs


def _metrics(scores: np.ndarray, target: np.ndarray, regression: bool) -> dict[str, float | None]:
    if regression:
        values = scores[:, 0].tolist()
        gold = target.tolist()
        return {
            "pearson": pearson(gold, values),
            "spearman": spearman(gold, values),
            "mse": mean_squared_error(gold, values),
        }
    predicted = scores.argmax(axis=1).tolist()
    gold = target.tolist()
    return {"accuracy": accuracy(gold, predicted), "f1": macro_f1(gold, predicted, scores.shape[1])}


def _targets(run: CvRun, names: list[Any]) -> np.ndarray:
    if run.regression:
        try:
            return np.asarray(run.gold, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{run.path}/oof.jsonl: regression gold labels must be numbers") from None
    index = {str(n): i for i, n in enumerate(names)}  # gold 1 and label "1" are the same class
    targets = []
    for row, gold in zip(run.rows, run.gold, strict=True):
        key = str(gold)
        if key not in index:
            raise ValueError(f"{run.path}/oof.jsonl: row {row} has gold {gold!r}, not one of the labels {names}")
        targets.append(index[key])
    return np.asarray(targets)


def _record(scores_row: np.ndarray, names: list[Any] | None) -> dict[str, Any]:
    if names is None:
        value = float(scores_row[0])
        return {"score": value, "scores": value}
    best = int(np.argmax(scores_row))
    return {"label": names[best], "score": float(scores_row[best]), "scores": [float(s) for s in scores_row]}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _report(method, meta, runs, run_metrics, metrics, fold_metrics, weights_text) -> str:
    keys = list(metrics)
    lines = [f"# Ensemble: {method}" + (f" (meta model: {meta})" if method == "stacking" else ""), ""]
    lines += ["Out-of-fold metrics (every number is out of fold; fitted methods are nested over the folds).", ""]
    lines += ["| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for run in runs:
        lines.append(f"| {run.path} | " + " | ".join(_fmt(run_metrics[str(run.path)][k]) for k in keys) + " |")
    lines.append(f"| **ensemble ({method})** | " + " | ".join(_fmt(metrics[k]) for k in keys) + " |")
    lines += ["", "Ensemble per held-out fold:", ""]
    lines += ["| fold | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for values in fold_metrics["folds"]:
        lines.append(f"| {values['fold']} | " + " | ".join(_fmt(values[k]) for k in keys) + " |")
    for stat in ("mean", "std"):
        lines.append(f"| {stat} | " + " | ".join(_fmt(fold_metrics[stat].get(k)) for k in keys) + " |")
    lines += ["", weights_text, ""]
    return "\n".join(lines)


def ensemble(
    run_dirs: list[str | os.PathLike],
    output_dir: str | os.PathLike,
    method: str = "mean",
    meta: str | None = None,
) -> EnsembleResult:
    """Combine ``bunmyaku cv`` runs into one ensemble and write its out-of-fold predictions and report.

    Args:
        run_dirs: ``cv`` output folders of the same training file with the same folds.
        output_dir: where ``oof.jsonl``, ``metrics.json``, ``report.md`` (and ``test_predictions.jsonl``) go.
        method: ``mean`` (probability average), ``rank`` (rank average per class), ``weighted`` (non-negative
            weights summing to 1 fitted on the out-of-fold scores) or ``stacking`` (a second-stage model on the
            runs' log-probabilities, or on their values for regression).
        meta: stacking's model: ``logistic`` (classification, the default there) or ``ridge`` (regression, the
            default there).

    Returns:
        The ensemble's metrics, each run's, the per-fold metrics and the weights fitted on all folds.

    Raises:
        ValueError: an unknown method or meta model, or runs that do not share rows, gold labels, folds or labels.
        FileNotFoundError: a run folder without ``oof.jsonl``.
    """
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if meta is not None and meta not in METAS:
        raise ValueError(f"--meta {meta!r}: expected one of {', '.join(METAS)}")
    if meta is not None and method != "stacking":
        raise ValueError(f"--meta {meta} is for --method stacking, not {method}")
    out = Path(output_dir)
    family = common_family(run_dirs)
    if family in STRUCTURED:
        return ensemble_structured(family, run_dirs, out, method)
    runs = [load_cv_run(d) for d in run_dirs]
    for run in runs:
        if out.resolve() == run.path.resolve():
            raise ValueError(f"--output-dir {out} is an input run folder; give the ensemble its own folder")
    check_compatible(runs)
    base = runs[0]
    regression = base.regression
    if method == "stacking":
        meta = meta or ("ridge" if regression else "logistic")
        if meta == "logistic" and regression:
            raise ValueError("--meta logistic is for classification; these runs are regression: use --meta ridge")
        if meta == "ridge" and not regression:
            raise ValueError("--meta ridge is for regression; these runs are classification: use --meta logistic")
    names = family_names(family, runs)
    target = _targets(base, names or [])
    stack = np.stack([run.scores for run in runs])
    with_test = all(run.test_scores is not None for run in runs)
    if not with_test and any(run.test_scores is not None for run in runs):
        logger.warning("not every run has test_predictions.jsonl: no test predictions written")
    test_stack = np.stack([run.test_scores for run in runs]) if with_test else None

    oof, test, fitted = combine(stack, base.folds, target, method, regression, meta, test_stack)

    metrics = _metrics(oof, target, regression)
    run_metrics = {str(run.path): _metrics(run.scores, target, regression) for run in runs}
    per_fold = []
    for fold in np.unique(base.folds):
        held = base.folds == fold
        values = _metrics(oof[held], target[held], regression)
        per_fold.append({"fold": int(fold), "examples": int(held.sum()), **values})
    fold_metrics = fold_summary(per_fold)  # cv's fold_metrics.json, from the same function
    weights: dict[str, Any] = {}
    if method == "weighted":
        weights = {str(run.path): float(w) for run, w in zip(runs, fitted, strict=True)}
        weights_text = "Weights fitted on all folds (used for the test predictions):\n\n" + "\n".join(
            f"- {path}: {w:.4f}" for path, w in weights.items()
        )
    elif method == "stacking":
        coef = np.atleast_2d(fitted.coef_)
        width = stack.shape[2]
        weights = {str(run.path): coef[:, r * width : (r + 1) * width].tolist() for r, run in enumerate(runs)} | {
            "intercept": np.atleast_1d(fitted.intercept_).tolist()
        }
        columns = "a run's values" if regression else "a run's log-probabilities"
        weights_text = f"Meta model ({meta}) coefficients fitted on all folds (rows: classes; columns: {columns}):"
        listed = [f"- {path}: {np.round(np.asarray(c), 4).tolist()}" for path, c in weights.items()]
        weights_text += "\n\n" + "\n".join(listed)
    else:
        weights_text = f"No fitted weights: {method} gives every run the same weight."

    out.mkdir(parents=True, exist_ok=True)
    records = []
    for record, scores_row in zip(base.records, oof, strict=True):
        records.append(family_record(family, record, scores_row, names))
    write_jsonl_atomic(out / "oof.jsonl", records)
    if test is not None:
        write_jsonl_atomic(
            out / "test_predictions.jsonl",
            [family_record(family, {"row": int(row)}, s, names) for row, s in zip(base.test_rows, test, strict=True)],
        )
    write_text_atomic(out / "report.md", _report(method, meta, runs, run_metrics, metrics, fold_metrics, weights_text))
    write_json_atomic(out / "fold_metrics.json", fold_metrics, sort_keys=False)
    write_json_atomic(out / "metrics.json", metrics, sort_keys=False)  # last: its presence means the ensemble finished
    logger.info("ensemble %s of %d runs: %s", method, len(runs), metrics)
    return EnsembleResult(method, metrics, run_metrics, fold_metrics, weights, oof)


# ------------------------------------------------------------------------------------------------
# Task families: what each run's cv.json says it holds, and the families whose scores are not one matrix

STRUCTURED = {"tags": "token-classification", "answers": "question-answering"}


def _cv_settings(run_dir: Path) -> dict[str, Any] | None:
    """The finetune settings of a ``cv`` run (its ``cv.json``), or None for a folder without one."""
    path = run_dir / "cv.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("finetune") or {}
    except (ValueError, AttributeError):
        raise ValueError(f"{path}: not a cv settings file (invalid JSON)") from None


def run_family(run_dir: Path) -> str | None:
    """The kind of scores a run holds (:mod:`bunmyaku.tasks.averaging`'s kinds, with ``multiple-choice`` and
    ``bi-encoder`` told apart from classification and regression), or None when the folder has no ``cv.json``."""
    settings = _cv_settings(run_dir)
    if settings is None:
        return None
    task = settings.get("task")
    if task == "multiple-choice":
        return "multiple-choice"
    if task == "sentence-similarity" and settings.get("encoder") == "bi":
        return "bi-encoder"
    if task == "token-classification":
        return "tags"
    if task == "question-answering":
        return "answers"
    return "classification"


def common_family(run_dirs: list[str | os.PathLike]) -> str | None:
    """The one family of all runs; refuses runs of different task families."""
    families = {str(d): run_family(Path(d)) for d in run_dirs}
    known = {f for f in families.values() if f is not None}
    if len(known) > 1:
        shown = ", ".join(f"{d}: {f}" for d, f in families.items())
        raise ValueError(f"the runs are of different task families ({shown}); ensemble runs of one task")
    if known and None in families.values() and known & set(STRUCTURED):
        raise ValueError(f"the runs are of different task families ({families}); ensemble runs of one task")
    return next(iter(known), None)


def family_names(family: str | None, runs: list[CvRun]) -> list[Any] | None:
    """Class names: choice indices for multiple choice, None for values (regression, bi-encoder)."""
    if family == "multiple-choice":
        return list(range(runs[0].scores.shape[1]))
    return None if runs[0].regression else _class_names(runs)


def family_record(family: str | None, record: dict[str, Any], scores_row: np.ndarray, names: list[Any] | None):
    """An ensemble oof / test record: ``record``'s fields without the run's own prediction, plus the ensemble's
    in cv's format (a bi-encoder's value is its ``cosine``; a multiple-choice ``choice`` text is dropped: the
    ensemble has no choices to name)."""
    dropped = ("label", "labels", "score", "scores", "cosine", "choice")
    kept = {k: v for k, v in record.items() if k not in dropped}
    if family == "bi-encoder":
        value = float(scores_row[0])
        return kept | {"cosine": value, "scores": value}
    return kept | _record(scores_row, names)


def _model_labels(run_dir: Path) -> list[str]:
    """id2label of the run's first fold model (``fold*/model`` or, with seeds, ``fold*/seed*/model``)."""
    configs = sorted(run_dir.glob("fold*/model/config.json")) + sorted(run_dir.glob("fold*/seed*/model/config.json"))
    for config in configs:
        id2label = json.loads(config.read_text(encoding="utf-8")).get("id2label") or {}
        return [id2label[str(i)] for i in range(len(id2label))]
    raise ValueError(f"{run_dir}: no fold*/model/config.json to read the tags (id2label) from")


@dataclass
class _StructuredRun:
    path: Path
    records: list[dict[str, Any]]
    test_records: list[dict[str, Any]] | None


def _read_structured(run_dir: str | os.PathLike) -> _StructuredRun:
    path = Path(run_dir)
    oof = path / "oof.jsonl"
    if not oof.is_file():
        raise FileNotFoundError(f"{oof}: no such file (ensemble needs bunmyaku cv output folders)")
    records = _sorted_by_row(_read_jsonl(oof), oof)
    for record in records:
        for key in ("fold", "gold", "scores"):
            if key not in record:
                raise ValueError(f"{oof}: row {record['row']} has no '{key}'")
    test = path / "test_predictions.jsonl"
    test_records = _sorted_by_row(_read_jsonl(test), test) if test.is_file() else None
    return _StructuredRun(path, records, test_records)


def _check_structured(runs: list[_StructuredRun]) -> None:
    base = runs[0]
    for run in runs[1:]:
        pair = f"{base.path} and {run.path}"
        rows, other = [r["row"] for r in base.records], [r["row"] for r in run.records]
        if rows != other:
            missing = sorted(set(rows) ^ set(other))
            raise ValueError(
                f"{pair} do not share the training rows (first row in one but not the other: {missing[0]}); "
                "ensemble runs of the same training file"
            )
        for key, what in (("gold", "gold labels"), ("fold", "folds")):
            i = _first_difference([r[key] for r in base.records], [r[key] for r in run.records])
            if i >= 0:
                raise ValueError(
                    f"{pair} do not share the {what}: row {rows[i]} has {key} {base.records[i][key]!r} vs "
                    f"{run.records[i][key]!r}"
                    + (" (run cv with the same --folds, --fold-seed and --group-column)" if key == "fold" else "")
                )
        if base.test_records is not None and run.test_records is not None:
            if [r["row"] for r in base.test_records] != [r["row"] for r in run.test_records]:
                raise ValueError(f"{pair} do not share the test rows (test_predictions.jsonl)")


def _decode_structured(family: str, records, scores, names, null_threshold):
    """(prediction fields per record, their metrics or None without gold) for averaged tags or answers."""
    gold = [r.get("gold") for r in records]
    labelled = all("gold" in r for r in records)
    if family == "tags":
        texts = None if "tokens" in records[0] else [r["text"] for r in records]
        predicted = averaging.tag_predictions(scores, names, texts)
        return predicted, averaging.tag_metrics(gold, predicted, scores, texts) if labelled else None
    predicted = averaging.answer_predictions(scores, null_threshold)
    return predicted, averaging.answer_metrics(gold, predicted) if labelled else None


def ensemble_structured(family: str, run_dirs: list[str | os.PathLike], out: Path, method: str) -> EnsembleResult:
    """``ensemble --method mean`` of token-classification or QA runs: the scores averaged as ``cv`` averages its
    seeds (:func:`bunmyaku.tasks.averaging.average`) and decoded the same way."""
    from bunmyaku.tasks import averaging

    task = STRUCTURED[family]
    if method != "mean":
        raise ValueError(
            f"--method {method} does not apply to {task}: its scores are "
            + ("per-word or per-character tag probabilities" if family == "tags" else "n-best candidate answer spans")
            + ", not one score vector per row to rank, weight or stack; use --method mean"
        )
    runs = [_read_structured(d) for d in run_dirs]
    for run in runs:
        if out.resolve() == run.path.resolve():
            raise ValueError(f"--output-dir {out} is an input run folder; give the ensemble its own folder")
    _check_structured(runs)
    names = None
    if family == "tags":
        names = _model_labels(runs[0].path)
        for run in runs[1:]:
            if _model_labels(run.path) != names:
                raise ValueError(f"{runs[0].path} and {run.path} do not share the tag set (their models' id2label)")
    null_threshold = float((_cv_settings(runs[0].path) or {}).get("null_threshold", 0.0))
    base = runs[0]

    def combined(records_of_runs, records):
        scores = averaging.average(family, [[r["scores"] for r in rs] for rs in records_of_runs])
        predicted, metrics = _decode_structured(family, records, scores, names, null_threshold)
        return scores, predicted, metrics

    kind = "entities" if family == "tags" else "prediction_text"
    dropped = ("tags", "entities", "prediction_text", "score", "scores")
    scores, predicted, metrics = combined([run.records for run in runs], base.records)
    oof = [
        {k: v for k, v in r.items() if k not in dropped} | p | {"scores": s}
        for r, p, s in zip(base.records, predicted, scores, strict=True)
    ]
    run_metrics = {str(run.path): combined([run.records], run.records)[2] or {} for run in runs}
    folds = sorted({r["fold"] for r in base.records})
    per_fold = []
    for k in folds:
        held = [i for i, r in enumerate(base.records) if r["fold"] == k]
        _, values = _decode_structured(
            family, [base.records[i] for i in held], [scores[i] for i in held], names, null_threshold
        )
        per_fold.append({"fold": k, "examples": len(held), **(values or {})})
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out / "oof.jsonl", oof)
    fold_metrics = fold_summary(per_fold)
    write_json_atomic(out / "fold_metrics.json", fold_metrics, sort_keys=False)
    if all(run.test_records is not None for run in runs):
        test_scores, test_predicted, _ = combined([run.test_records for run in runs], base.test_records)
        write_jsonl_atomic(
            out / "test_predictions.jsonl",
            [
                {k: v for k, v in r.items() if k not in dropped} | p | {"scores": s}
                for r, p, s in zip(base.test_records, test_predicted, test_scores, strict=True)
            ],
        )
    elif any(run.test_records is not None for run in runs):
        logger.warning("not every run has test_predictions.jsonl: no test predictions written")
    text = f"No fitted weights: mean gives every run the same weight ({task}: {kind} from the averaged scores)."
    write_text_atomic(out / "report.md", _report(method, None, runs, run_metrics, metrics or {}, fold_metrics, text))
    write_json_atomic(out / "metrics.json", metrics or {}, sort_keys=False)  # last: it marks a finished ensemble
    logger.info("ensemble %s of %d runs: %s", method, len(runs), metrics)
    return EnsembleResult(method, metrics or {}, run_metrics, fold_metrics, {}, None)
