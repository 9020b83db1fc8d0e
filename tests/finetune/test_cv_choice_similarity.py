"""bunmyaku cv for multiple choice and bi-encoder sentence similarity: the oof contract, stratified folds, metrics
recomputed from oof.jsonl (scikit-learn / scipy), seed averages against each fold model loaded in `transformers`,
and ensembles (mean, rank, weighted, stacking) of these runs."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest

import bunmyaku
from tests.conftest import require_module
from tests.finetune.cv_checks import (
    FAST,
    check_ensemble_of_one_run,
    check_fold_metrics,
    check_mismatched_runs_refused,
    check_rows_and_folds,
    read_jsonl,
)
from tests.finetune.helpers import FILLER, GOOD, NAMES, PLACES

CHOICES = ["c0", "c1", "c2"]


def choice_rows(n, seed=0):
    """Questions with three choices; the right one is a name, the others filler words (label i % 3)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 3
        picked = rng.sample(FILLER, 3)
        picked[label] = rng.choice(NAMES)
        rows.append({"text": f"who lives in {rng.choice(PLACES)} ?", **dict(zip(CHOICES, picked, strict=True))})
        rows[-1]["label"] = label
    return rows


def pair_rows(n, seed=0):
    """Sentence pairs scored by how many sentiment words they share."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        shared = rng.randint(0, 2)
        words = rng.sample(GOOD, 4)
        rows.append(
            {
                "text": " ".join(words[:2] + rng.sample(FILLER, 2)),
                "pair": " ".join(words[:shared] + words[2 : 4 - shared] + rng.sample(FILLER, 2)),
                "label": shared / 2,
            }
        )
    return rows


@pytest.fixture(scope="module")
def choice_run(tmp_path_factory, tiny_bert_dir):
    out = tmp_path_factory.mktemp("cv-choice") / "run"
    bunmyaku.cv(
        **FAST,
        task="multiple-choice",
        choice_columns=",".join(CHOICES),
        model=tiny_bert_dir,
        train=choice_rows(12),
        test=choice_rows(4, seed=7),
        folds=2,
        seeds="0,1",
        output_dir=out,
    )
    return out


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory, tiny_bert_dir):
    out = tmp_path_factory.mktemp("cv-pairs") / "run"
    settings = {"task": "sentence-similarity", "encoder": "bi", "text_pair_column": "pair", "model": tiny_bert_dir}
    data = {"train": pair_rows(12), "test": pair_rows(4, seed=7)}
    bunmyaku.cv(**FAST, **settings, **data, folds=2, seeds="0,1", output_dir=out)
    return out


def choice_probabilities(model_dir, rows):
    """`transformers` as the oracle: a multiple-choice model's softmax over the choices."""
    transformers, torch = require_module("transformers"), require_module("torch")
    model = transformers.AutoModelForMultipleChoice.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    firsts = [r["text"] for r in rows for _ in CHOICES]
    seconds = [r[c] for r in rows for c in CHOICES]
    batch = tokenizer(firsts, seconds, return_tensors="pt", padding=True)
    batch = {k: v.view(len(rows), len(CHOICES), -1) for k, v in batch.items()}
    with torch.no_grad():
        return model(**batch).logits.softmax(-1).double().numpy()


def cosines(model_dir, rows):
    """`transformers` as the oracle: mean-pooled embeddings of both sides, their cosine."""
    transformers, torch = require_module("transformers"), require_module("torch")
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)

    def embed(texts):
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1)

    a, b = embed([r["text"] for r in rows]), embed([r["pair"] for r in rows])
    return torch.nn.functional.cosine_similarity(a, b).double().numpy()


def test_choice_oof_contract_stratified_and_metrics(choice_run):
    sk = require_module("sklearn.metrics")
    rows = choice_rows(12)
    oof = check_rows_and_folds(choice_run, len(rows))
    for k in (0, 1):  # stratified by the right choice: 4 of each in 12 rows, so 2 of each per fold
        assert Counter(r["gold"] for r in oof if r["fold"] == k) == {0: 2, 1: 2, 2: 2}
    for record, row in zip(oof, rows, strict=True):
        assert record["gold"] == row["label"] and record["text"] == row["text"]
        assert len(record["scores"]) == 3 and sum(record["scores"]) == pytest.approx(1.0, abs=1e-6)
        assert record["label"] == int(np.argmax(record["scores"])) and record["choice"] == row[f"c{record['label']}"]
        assert record["score"] == pytest.approx(max(record["scores"]), abs=1e-9)
    written = json.loads((choice_run / "metrics.json").read_text())
    gold, predicted = [r["gold"] for r in oof], [r["label"] for r in oof]
    assert list(written) == ["accuracy"] and written["accuracy"] == pytest.approx(sk.accuracy_score(gold, predicted))
    check_fold_metrics(
        choice_run, lambda held: {"accuracy": sk.accuracy_score([r["gold"] for r in held], [r["label"] for r in held])}
    )


def test_choice_seeds_and_folds_average_the_fold_models(choice_run):
    rows, test = choice_rows(12), choice_rows(4, seed=7)
    oof = read_jsonl(choice_run / "oof.jsonl")
    models = {(k, s): choice_run / f"fold{k}" / f"seed{s}" / "model" for k in (0, 1) for s in (0, 1)}
    for k in (0, 1):
        held = [row for row, r in zip(rows, oof, strict=True) if r["fold"] == k]
        seeds = [choice_probabilities(models[k, s], held) for s in (0, 1)]
        assert not np.allclose(seeds[0], seeds[1], atol=1e-6, rtol=0)  # two different models
        np.testing.assert_allclose([r["scores"] for r in oof if r["fold"] == k], np.mean(seeds, axis=0), atol=1e-6)
    expected = np.mean([choice_probabilities(m, test) for m in models.values()], axis=0)
    written = read_jsonl(choice_run / "test_predictions.jsonl")
    np.testing.assert_allclose([w["scores"] for w in written], expected, atol=1e-6)
    assert [w["label"] for w in written] == expected.argmax(1).tolist()
    test_metrics = json.loads((choice_run / "test_metrics.json").read_text())
    assert test_metrics["accuracy"] == pytest.approx(np.mean(expected.argmax(1) == [t["label"] for t in test]))


def test_choice_ensembles(choice_run, pair_run, tmp_path):
    check_ensemble_of_one_run(choice_run, tmp_path, methods=("mean", "weighted"))
    check_mismatched_runs_refused(choice_run, pair_run, tmp_path)
    from bunmyaku.tasks.ensemble import ensemble

    oof = read_jsonl(choice_run / "oof.jsonl")
    gold = np.array([r["gold"] for r in oof])
    for method in ("rank", "stacking"):  # classification over the choices: every method applies
        result = ensemble([choice_run, choice_run], tmp_path / method, method=method)
        written = read_jsonl(tmp_path / method / "oof.jsonl")
        labels = [w["label"] for w in written]
        assert set(labels) <= {0, 1, 2} and labels == [int(np.argmax(w["scores"])) for w in written]
        assert result.metrics["accuracy"] == pytest.approx(np.mean(np.array(labels) == gold))


def test_pair_oof_contract_metrics_and_seed_average(pair_run):
    stats = require_module("scipy.stats")
    rows, test = pair_rows(12), pair_rows(4, seed=7)
    oof = check_rows_and_folds(pair_run, len(rows))
    for record, row in zip(oof, rows, strict=True):
        assert record["gold"] == row["label"] and record["text_pair"] == row["pair"]
        assert record["scores"] == record["cosine"]  # the value, once
    gold, values = [r["gold"] for r in oof], [r["cosine"] for r in oof]
    written = json.loads((pair_run / "metrics.json").read_text())
    assert written["pearson"] == pytest.approx(stats.pearsonr(gold, values)[0], abs=1e-9)
    assert written["spearman"] == pytest.approx(stats.spearmanr(gold, values)[0], abs=1e-9)

    def both(held):
        g, v = [r["gold"] for r in held], [r["cosine"] for r in held]
        return {"pearson": stats.pearsonr(g, v)[0], "spearman": stats.spearmanr(g, v)[0]}

    check_fold_metrics(pair_run, both)
    models = {(k, s): pair_run / f"fold{k}" / f"seed{s}" / "model" for k in (0, 1) for s in (0, 1)}
    for k in (0, 1):
        held = [row for row, r in zip(rows, oof, strict=True) if r["fold"] == k]
        seeds = [cosines(models[k, s], held) for s in (0, 1)]
        assert not np.allclose(seeds[0], seeds[1], atol=1e-6, rtol=0)
        np.testing.assert_allclose([r["scores"] for r in oof if r["fold"] == k], np.mean(seeds, axis=0), atol=1e-6)
    expected = np.mean([cosines(m, test) for m in models.values()], axis=0)
    written = read_jsonl(pair_run / "test_predictions.jsonl")
    np.testing.assert_allclose([w["cosine"] for w in written], expected, atol=1e-6)


def test_pair_ensembles(pair_run, choice_run, tmp_path, tiny_bert_dir):
    check_ensemble_of_one_run(pair_run, tmp_path, methods=("mean", "weighted"))
    check_mismatched_runs_refused(pair_run, choice_run, tmp_path)
    from bunmyaku.tasks.ensemble import ensemble

    other = tmp_path / "other"  # the same folds, another seed: a second model to weigh and stack
    settings = {"task": "sentence-similarity", "encoder": "bi", "text_pair_column": "pair", "model": tiny_bert_dir}
    bunmyaku.cv(**{**FAST, "epochs": 1}, **settings, train=pair_rows(12), folds=2, seed=5, output_dir=other)
    weighted = ensemble([pair_run, other], tmp_path / "weighted", method="weighted")
    assert all(w >= 0 for w in weighted.weights.values()) and sum(weighted.weights.values()) == pytest.approx(1.0)
    runs = [np.array([r["scores"] for r in read_jsonl(d / "oof.jsonl")]) for d in (pair_run, other)]
    mean = ensemble([pair_run, other], tmp_path / "mean", method="mean")
    np.testing.assert_allclose(mean.oof_scores[:, 0], np.mean(runs, axis=0), atol=1e-12)
    written = read_jsonl(tmp_path / "mean" / "oof.jsonl")
    assert [w["cosine"] for w in written] == pytest.approx(np.mean(runs, axis=0).tolist())
    stacked = ensemble([pair_run, other], tmp_path / "stacking", method="stacking")
    assert set(stacked.metrics) >= {"pearson", "spearman"}


def test_bi_encoder_cv_needs_scores(tmp_path, tiny_bert_dir):
    rows = [{k: v for k, v in r.items() if k != "label"} for r in pair_rows(6)]
    settings = {"task": "sentence-similarity", "encoder": "bi", "text_pair_column": "pair", "loss": "contrastive"}
    with pytest.raises(ValueError, match="row 1: cv of a bi-encoder needs a score for every pair"):
        bunmyaku.cv(**FAST, **settings, model=tiny_bert_dir, train=rows, folds=2, output_dir=tmp_path / "x")
