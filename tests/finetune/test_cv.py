"""bunmyaku cv / bunmyaku.cv: k-fold fine-tuning on finetune, out-of-fold records and metrics (recomputed here with
scikit-learn from oof.jsonl), stratified and group folds, resume, seed averaging and test predictions."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from typer.testing import CliRunner

from bunmyaku.cli import app
from tests.conftest import require_module
from tests.finetune.helpers import sentiment_rows

runner = CliRunner()
FAST = {
    "task": "text-classification",
    "epochs": 10,
    "batch_size": 4,
    "max_length": 32,
    "lr": 3e-3,
    "progress": False,
    "plot": False,
    "device": "cpu",
    "log_every": 1000,
}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def rows():
    return [{"text": t, "label": lab} for t, lab in sentiment_rows(18)]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("cvdata") / "train.tsv"
    path.write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def cli_cv(tmp_path_factory, tiny_bert_dir, train_file):
    out = tmp_path_factory.mktemp("cv") / "run"
    flags = ["cv", "--model", str(tiny_bert_dir), "--train", str(train_file), "--folds", "3", "--fold-seed", "1"]
    flags += ["--output-dir", str(out), "--no-progress", "--no-plot", "--device", "cpu"]
    for key in ("epochs", "batch_size", "max_length", "lr"):
        flags += ["--" + key.replace("_", "-"), str(FAST[key])]
    result = runner.invoke(app, flags)
    assert result.exit_code == 0, result.output
    return out


def test_every_row_once_folds_disjoint_and_stratified(cli_cv, rows):
    oof = read_jsonl(cli_cv / "oof.jsonl")
    assert [r["row"] for r in oof] == list(range(len(rows)))  # every row exactly once, in file order
    assert [r["text"] for r in oof] == [r["text"] for r in rows]
    assert [r["gold"] for r in oof] == [r["label"] for r in rows]
    folds = {r["fold"] for r in oof}
    assert folds == {0, 1, 2}  # one fold per row: disjoint by construction of the records, and all used
    for k in folds:
        held = [r for r in oof if r["fold"] == k]
        # fold k's run evaluated on exactly its held-out rows, and trained on the others
        predictions = read_jsonl(cli_cv / f"fold{k}" / "predictions.jsonl")
        assert [p["text"] for p in predictions] == [r["text"] for r in held]
        assert json.loads((cli_cv / f"fold{k}" / "metrics.json").read_text())["train_examples"] == len(rows) - len(held)
        # stratified: 9 of each class in 3 folds, so exactly 3 of each in every fold
        assert Counter(r["gold"] for r in held) == {"pos": 3, "neg": 3}
    # scores: probabilities in id2label order, the label their argmax, the score the label's probability
    config = json.loads((cli_cv / "fold0" / "model" / "config.json").read_text())
    names = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    for r in oof:
        assert len(r["scores"]) == 2 and sum(r["scores"]) == pytest.approx(1.0, abs=1e-6)
        assert r["label"] == names[int(np.argmax(r["scores"]))]
        assert r["score"] == pytest.approx(max(r["scores"]), abs=1e-6)


def test_oof_metrics_recomputed_with_sklearn(cli_cv, rows):
    metrics_module = require_module("sklearn.metrics")
    oof = read_jsonl(cli_cv / "oof.jsonl")
    gold, predicted = [r["gold"] for r in oof], [r["label"] for r in oof]
    assert len(set(predicted)) == 2  # the models learned something: the metrics below are not a constant's
    written = json.loads((cli_cv / "metrics.json").read_text())
    assert written["accuracy"] == pytest.approx(metrics_module.accuracy_score(gold, predicted), abs=1e-9)
    assert written["f1"] == pytest.approx(metrics_module.f1_score(gold, predicted, average="macro"), abs=1e-9)
    per_fold = json.loads((cli_cv / "fold_metrics.json").read_text())
    accuracies = []
    for k, entry in enumerate(per_fold["folds"]):
        held = [r for r in oof if r["fold"] == k]
        accuracies.append(metrics_module.accuracy_score([r["gold"] for r in held], [r["label"] for r in held]))
        assert entry["accuracy"] == pytest.approx(accuracies[-1], abs=1e-9) and entry["examples"] == len(held)
    assert per_fold["mean"]["accuracy"] == pytest.approx(np.mean(accuracies))
    assert per_fold["std"]["accuracy"] == pytest.approx(np.std(accuracies))


def test_fold_models_load_in_transformers(cli_cv):
    transformers = require_module("transformers")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(cli_cv / "fold2" / "model")
    assert model.config.num_labels == 2


@pytest.mark.parametrize("fold_seed", range(6))
def test_folds_are_stratified_for_every_seed(rows, fold_seed):
    from bunmyaku.tasks.cv import CvArgs, assign_folds
    from bunmyaku.tasks.finetune import FinetuneArgs, build_task

    labelled = [{"text": "x", "label": "a" if i % 3 == 0 else "b"} for i in range(30)]  # 10 a, 20 b
    fold, kind = assign_folds(build_task(FinetuneArgs()), labelled, CvArgs(folds=5, fold_seed=fold_seed), "")
    assert kind == "stratified" and sorted(Counter(fold).values()) == [6] * 5
    for k in range(5):
        assert Counter(labelled[i]["label"] for i, f in enumerate(fold) if f == k) == {"a": 2, "b": 4}
