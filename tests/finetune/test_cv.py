"""bunmyaku cv / bunmyaku.cv: k-fold fine-tuning on finetune, out-of-fold records and metrics (recomputed here with
scikit-learn from oof.jsonl), stratified and group folds, resume, seed averaging and test predictions."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from typer.testing import CliRunner

import bunmyaku
from bunmyaku.cli import app
from bunmyaku.training import Plugin
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
    test = train_file.parent / "test.tsv"
    test.write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in sentiment_rows(6, seed=3)))
    flags += ["--test", str(test), "--output-dir", str(out), "--no-progress", "--no-plot", "--device", "cpu"]
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


def test_a_labelled_test_file_gets_averaged_predictions_and_metrics(cli_cv):
    sk = require_module("sklearn.metrics")
    written = read_jsonl(cli_cv / "test_predictions.jsonl")
    assert [w["gold"] for w in written] == [lab for _, lab in sentiment_rows(6, seed=3)]
    for w in written:
        assert sum(w["scores"]) == pytest.approx(1.0, abs=1e-6) and w["score"] == pytest.approx(max(w["scores"]))
    metrics = json.loads((cli_cv / "test_metrics.json").read_text())
    gold, predicted = [w["gold"] for w in written], [w["label"] for w in written]
    assert metrics["accuracy"] == pytest.approx(sk.accuracy_score(gold, predicted))
    assert metrics["f1"] == pytest.approx(sk.f1_score(gold, predicted, average="macro"))


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


class Crash(Plugin):
    """Kills the run once, at step 7 of the second fold (after the step-6 checkpoint)."""

    armed = False

    def before_optimizer_step(self, trainer):
        if Crash.armed and trainer.step >= 7 and "fold1" in str(trainer.output_dir):
            Crash.armed = False
            raise RuntimeError("crash for the test")


def mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_killed_run_resumes_and_finished_folds_are_skipped(tmp_path, tiny_bert_dir, train_file, cli_cv):
    out = tmp_path / "run"
    settings = {**FAST, "model": tiny_bert_dir, "train": train_file, "folds": 3, "fold_seed": 1, "output_dir": out}
    settings.update(save_every=6, callbacks=["tests.finetune.test_cv:Crash"])
    Crash.armed = True
    with pytest.raises(RuntimeError, match="crash for the test"):
        bunmyaku.cv(**settings)
    assert (out / "fold0" / "metrics.json").is_file() and not (out / "fold1" / "metrics.json").exists()
    assert not (out / "oof.jsonl").exists() and not (out / "metrics.json").exists()
    first = mtimes(out / "fold0")
    result = bunmyaku.cv(**settings)
    assert mtimes(out / "fold0") == first  # the finished fold was not trained again
    assert "Resumed from" in (out / "fold1" / "finetune.log").read_text()  # the killed fold went on from step 6
    expected = read_jsonl(cli_cv / "oof.jsonl")
    assert read_jsonl(out / "oof.jsonl") == expected == result.oof  # as if never killed
    assert json.loads((out / "metrics.json").read_text()) == json.loads((cli_cv / "metrics.json").read_text())

    # a fold whose metrics.json is gone is trained again; the others are left as they are
    (out / "fold2" / "metrics.json").unlink()
    kept = {**mtimes(out / "fold0"), **mtimes(out / "fold1")}
    bunmyaku.cv(**settings)
    assert {**mtimes(out / "fold0"), **mtimes(out / "fold1")} == kept
    assert (out / "fold2" / "metrics.json").is_file() and read_jsonl(out / "oof.jsonl") == expected

    with pytest.raises(ValueError, match=r"other settings \(cv, folds\)"):
        bunmyaku.cv(**{**settings, "fold_seed": 2})
    bunmyaku.cv(**{**settings, "fold_seed": 2, "overwrite": True})  # starts again from scratch
    assert json.loads((out / "cv.json").read_text())["cv"]["fold_seed"] == 2
    assert mtimes(out / "fold0").keys() == first.keys() and mtimes(out / "fold0") != first
    assert sorted({r["fold"] for r in read_jsonl(out / "oof.jsonl")}) == [0, 1, 2]


def test_group_folds_seed_average_and_test_predictions(tmp_path, tiny_bert_dir, rows):
    transformers = require_module("transformers")
    torch = require_module("torch")
    sk = require_module("sklearn.metrics")
    grouped = [{**r, "article": f"a{i // 3}"} for i, r in enumerate(rows)]  # 6 groups of 3
    test = [{"text": t, "label": lab} for t, lab in sentiment_rows(6, seed=5)]
    out = tmp_path / "run"
    result = bunmyaku.cv(
        **FAST,
        model=tiny_bert_dir,
        train=grouped,
        test=test,
        folds=2,
        group_column="article",
        seeds="0,1",
        output_dir=out,
    )
    oof = read_jsonl(out / "oof.jsonl")
    for group in {r["article"] for r in grouped}:  # a group is never split
        assert len({o["fold"] for o, r in zip(oof, grouped, strict=True) if r["article"] == group}) == 1
    assert {o["fold"] for o in oof} == {0, 1}

    def probabilities(model_dir, records):  # transformers as the oracle for each fold and seed model
        model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        batch = tokenizer([r["text"] for r in records], return_tensors="pt", padding=True)
        with torch.no_grad():
            return model(**batch).logits.softmax(-1).double().numpy()

    runs = [out / f"fold{k}" / f"seed{s}" / "model" for k in (0, 1) for s in (0, 1)]
    expected_test = np.mean([probabilities(run, test) for run in runs], axis=0)
    written = read_jsonl(out / "test_predictions.jsonl")
    np.testing.assert_allclose([w["scores"] for w in written], expected_test, atol=1e-5)
    assert [w["row"] for w in written] == list(range(len(test))) == [i for i, _ in enumerate(result.test_predictions)]
    gold, predicted = [t["label"] for t in test], [w["label"] for w in written]
    test_metrics = json.loads((out / "test_metrics.json").read_text())
    assert test_metrics["accuracy"] == pytest.approx(sk.accuracy_score(gold, predicted))
    for k in (0, 1):  # out of fold: the two seeds' models averaged on the fold's own rows
        held = [r for r, o in zip(grouped, oof, strict=True) if o["fold"] == k]
        seeds = [probabilities(out / f"fold{k}" / f"seed{s}" / "model", held) for s in (0, 1)]
        assert not np.allclose(seeds[0], seeds[1])  # the seeds trained different models
        np.testing.assert_allclose([o["scores"] for o in oof if o["fold"] == k], np.mean(seeds, axis=0), atol=1e-5)


def test_the_command_and_the_function_share_options_and_refuse_bad_ones(tmp_path, tiny_bert_dir, rows):
    import inspect

    parameters = inspect.signature(bunmyaku.cv).parameters
    assert parameters["folds"].default == 5 and parameters["seeds"].default is None
    assert set(inspect.signature(bunmyaku.finetune).parameters) < set(parameters)  # every finetune option too
    shown = runner.invoke(app, ["cv", "--help"], terminal_width=200).output
    assert "--folds" in shown and "--group-column" in shown and "--seeds" in shown and "--fold-seed" in shown
    base = {**FAST, "model": tiny_bert_dir, "train": rows, "output_dir": tmp_path / "x"}
    with pytest.raises(ValueError, match=r"label\(s\) \['neg', 'pos'\] have fewer than 10 examples"):
        bunmyaku.cv(**base, folds=10)
    with pytest.raises(ValueError, match="row 1: no group column 'article'"):
        bunmyaku.cv(**base, folds=2, group_column="article")
    with pytest.raises(ValueError, match="each fold out as its eval set"):
        bunmyaku.cv(**base, folds=2, eval_split=0.2)
    with pytest.raises(ValueError, match="seeds must be comma-separated integers"):
        bunmyaku.cv(**base, seeds="0,x")
    with pytest.raises(ValueError, match="cv supports the tasks"):
        bunmyaku.cv(**{**base, "task": "pair-classification", "choice_columns": "a,b"})
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['fold'\]"):
        bunmyaku.cv(**base, fold=2)
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_regression_oof_scores_are_the_values(tmp_path, tiny_bert_dir, rows):
    stats = require_module("scipy.stats")
    scored = [{"text": r["text"], "label": float(len(r["text"]) % 5)} for r in rows]
    out = tmp_path / "run"
    result = bunmyaku.cv(
        **{**FAST, "epochs": 2, "batch_size": 3},
        model=tiny_bert_dir,
        train=scored,
        problem_type="regression",
        folds=2,
        output_dir=out,
    )
    oof = read_jsonl(out / "oof.jsonl")
    assert [o["scores"] for o in oof] == pytest.approx([o["score"] for o in oof])  # the value, once
    gold, values = [r["label"] for r in scored], [o["score"] for o in oof]
    assert result.metrics["pearson"] == pytest.approx(stats.pearsonr(gold, values)[0], abs=1e-6)
    assert result.metrics["spearman"] == pytest.approx(stats.spearmanr(gold, values)[0], abs=1e-6)
