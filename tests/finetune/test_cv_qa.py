"""bunmyaku cv for extractive QA (SQuAD 2.0 JSON): one record per question, folds by article (--group-column
title), EM / F1 recomputed from oof.jsonl, n-best candidates averaged over seeds checked against each fold model
loaded in `transformers`, and ensembles (mean only)."""

from __future__ import annotations

import json
import math
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
    check_groups_kept,
    check_mismatched_runs_refused,
    check_rows_and_folds,
    ensemble_with_changed_copy,
    read_jsonl,
)
from tests.finetune.helpers import FILLER, NAMES, PLACES

N_BEST, MAX_LENGTH = 3, 48


def squad(path, articles, seed=0):
    """SQuAD 2.0: per article three paragraphs, one question each; the third is unanswerable."""
    rng = random.Random(seed)
    data, questions = [], []
    for a in range(articles):
        paragraphs = []
        for q in range(3):
            name, place = rng.choice(NAMES), rng.choice(PLACES)
            context = f"{' '.join(rng.sample(FILLER, 3))} {name} lives in {place} ."
            if q < 2:
                start = context.index(f" {name} lives") + 1
                qa = {"question": f"who lives in {place} ?", "answers": [{"text": name, "answer_start": start}]}
            else:
                qa = {"question": "who is great ?", "answers": [], "is_impossible": True}
            qa["id"] = f"a{a}q{q}"
            paragraphs.append({"context": context, "qas": [qa]})
            questions.append({"context": context, **qa, "article": a})
        data.append({"title": f"article {a}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    return questions


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("squad")
    train, test = folder / "train.json", folder / "test.json"
    return train, squad(train, 4), test, squad(test, 1, seed=7)


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory, tiny_bert_dir, qa_data):
    train, _, test, _ = qa_data
    out = tmp_path_factory.mktemp("cv-qa") / "run"
    settings = {"task": "question-answering", "n_best": N_BEST, "max_length": MAX_LENGTH}
    flat = {**FAST, **settings}
    bunmyaku.cv(
        **flat,
        model=tiny_bert_dir,
        train=str(train),
        test=str(test),
        folds=2,
        seeds="0,1",
        output_dir=out,
        group_column="title",
    )
    return out


def candidates(model_dir, questions):
    """`transformers` as the oracle: start + end logits of the top N_BEST starts and ends paired into valid spans
    inside the context, the best N_BEST kept, the [CLS] null score added, a softmax over them."""
    transformers, torch = require_module("transformers"), require_module("torch")
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    out = []
    for q in questions:
        batch = tokenizer(q["question"], q["context"], return_tensors="pt", return_offsets_mapping=True)
        offsets = batch.pop("offset_mapping")[0].tolist()
        in_context = [s == 1 for s in batch.sequence_ids(0)]
        with torch.no_grad():
            result = model(**batch)
        start, end = result.start_logits[0].double(), result.end_logits[0].double()
        spans = []
        for s in start.topk(N_BEST).indices.tolist():
            for e in end.topk(N_BEST).indices.tolist():
                if in_context[s] and in_context[e] and s <= e:
                    spans.append((float(start[s] + end[e]), offsets[s][0], offsets[e][1]))
        spans = sorted(spans, reverse=True)[:N_BEST]
        scores = [score for score, _, _ in spans] + [float(start[0] + end[0])]
        probabilities = np.exp(np.array(scores) - max(scores))
        probabilities /= probabilities.sum()
        found = {(a, b): p for (_, a, b), p in zip(spans, probabilities, strict=False)}
        out.append(found | {(-1, -1): probabilities[-1]})
    return out


def as_dict(written):
    return {(c["start"], c["end"]): c["probability"] for c in written}


def merged(per_model):
    """Candidates merged by (start, end): probabilities summed (0 where a model lacks one), over the models."""
    keys = set().union(*per_model)
    return {k: sum(m.get(k, 0.0) for m in per_model) / len(per_model) for k in keys}


def squad_scores(records, questions):
    """EM and token F1 written out (the answers are single lower-case words): max over the gold answers, ""
    for an unanswerable question."""
    em = f1 = 0.0
    for record, q in zip(records, questions, strict=True):
        golds = [a["text"] for a in q["answers"]] or [""]
        predicted = record["prediction_text"].split()
        em += max(float(record["prediction_text"].strip() == g) for g in golds)
        best = 0.0
        for g in golds:
            if not predicted or not g.split():
                best = max(best, float(predicted == g.split()))
                continue
            common = sum((Counter(predicted) & Counter(g.split())).values())
            if common:
                p, r = common / len(predicted), common / len(g.split())
                best = max(best, 2 * p * r / (p + r))
        f1 += best
    return {"exact_match": 100 * em / len(questions), "f1": 100 * f1 / len(questions)}


def test_one_record_per_question_folds_by_article_and_metrics(qa_run, qa_data):
    _, questions, _, _ = qa_data
    oof = check_rows_and_folds(qa_run, len(questions))
    check_groups_kept(oof, [q["article"] for q in questions])
    for record, q in zip(oof, questions, strict=True):
        assert record["id"] == q["id"] and record["question"] == q["question"]
        assert record["gold"] == [a["text"] for a in q["answers"]]
        probabilities = [c["probability"] for c in record["scores"]]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-9) and probabilities == sorted(probabilities)[::-1]
        assert {"start": -1, "end": -1, "text": ""} in [
            {k: c[k] for k in ("start", "end", "text")} for c in record["scores"]
        ]
        for c in record["scores"]:
            assert c["start"] < 0 or c["text"] == q["context"][c["start"] : c["end"]]
        top = record["scores"][0]
        assert record["prediction_text"] == top["text"] and record["score"] == pytest.approx(top["probability"])
    written = json.loads((qa_run / "metrics.json").read_text())
    assert written == pytest.approx(squad_scores(oof, questions), abs=1e-9)
    by_id = {q["id"]: q for q in questions}
    check_fold_metrics(qa_run, lambda held: squad_scores(held, [by_id[r["id"]] for r in held]))


def test_seed_average_merges_candidates_of_the_fold_models(qa_run, qa_data):
    _, questions, _, test = qa_data
    oof = read_jsonl(qa_run / "oof.jsonl")
    models = {(k, s): qa_run / f"fold{k}" / f"seed{s}" / "model" for k in (0, 1) for s in (0, 1)}
    for k in (0, 1):
        held = [q for q, r in zip(questions, oof, strict=True) if r["fold"] == k]
        seeds = [candidates(models[k, s], held) for s in (0, 1)]
        assert seeds[0] != seeds[1]
        for record, a, b in zip([r for r in oof if r["fold"] == k], *seeds, strict=True):
            expected, written = merged([a, b]), as_dict(record["scores"])
            assert written.keys() == expected.keys()
            for key, p in expected.items():
                assert written[key] == pytest.approx(p, abs=1e-6)
    runs = [candidates(m, test) for m in models.values()]
    for record, per_model in zip(read_jsonl(qa_run / "test_predictions.jsonl"), zip(*runs, strict=True), strict=True):
        expected = merged(list(per_model))
        assert as_dict(record["scores"]).keys() == expected.keys()
        assert max(expected, key=expected.get) == ((record["scores"][0]["start"], record["scores"][0]["end"]))


def test_answer_decoding_and_merging():
    from bunmyaku.tasks.averaging import average, decode_answer

    a = [
        {"start": 0, "end": 4, "text": "taro", "probability": 0.6},
        {"start": -1, "end": -1, "text": "", "probability": 0.4},
    ]
    b = [
        {"start": 5, "end": 8, "text": "ken", "probability": 0.7},
        {"start": 0, "end": 4, "text": "taro", "probability": 0.3},
    ]
    [mean] = average("answers", [[a], [b]])
    assert as_dict(mean) == pytest.approx({(0, 4): 0.45, (5, 8): 0.35, (-1, -1): 0.2})
    assert decode_answer(mean) == ("taro", pytest.approx(0.45))
    assert decode_answer(a, null_threshold=math.log(2)) == ("", 0.4)  # 0.6 does not beat 2 x 0.4
    assert decode_answer(a, null_threshold=math.log(1.4)) == ("taro", 0.6)


def test_qa_ensembles(qa_run, tmp_path):
    from bunmyaku.tasks.ensemble import ensemble

    check_ensemble_of_one_run(qa_run, tmp_path)
    check_mismatched_runs_refused(qa_run, None, tmp_path)
    for method in ("rank", "weighted", "stacking"):
        with pytest.raises(ValueError, match=rf"--method {method} does not apply to question-answering"):
            ensemble([qa_run, qa_run], tmp_path / method, method=method)


def test_group_column_for_squad_files(qa_data):
    from bunmyaku.tasks.cv import CvArgs, assign_folds
    from bunmyaku.tasks.finetune import FinetuneArgs, build_task

    train, questions, _, _ = qa_data
    task = build_task(FinetuneArgs(task="question-answering"))
    examples, source = task.read_data(str(train))
    for column, key in (("title", "article"), ("context", "context")):
        fold, kind = assign_folds(task, examples, CvArgs(folds=2, group_column=column), source)
        assert kind == "group"
        check_groups_kept([{"fold": f} for f in fold], [q[key] for q in questions])
    with pytest.raises(ValueError, match="row 1: no group column 'topic'"):
        assign_folds(task, examples, CvArgs(folds=2, group_column="topic"), source)


def test_fold_models_load_in_transformers(qa_run):
    transformers = require_module("transformers")
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(qa_run / "fold0" / "seed1" / "model")
    assert model.config.num_labels == 2


def test_ensemble_mean_of_two_runs_merges_candidates(qa_run, tmp_path):
    def flat(found):  # every candidate equally likely, and one new span the run never proposed
        extra = {"start": 0, "end": 0, "text": "", "probability": 0.0}  # no real span is empty
        return [{**c, "probability": 1 / (len(found) + 1)} for c in [*found, extra]]

    run, changed, written = ensemble_with_changed_copy(qa_run, tmp_path, flat)
    for a, b, w in zip(run, changed, written, strict=True):
        expected = merged([as_dict(a["scores"]), as_dict(b["scores"])])
        assert as_dict(w["scores"]) == pytest.approx(expected, abs=1e-12)
        top = max(expected, key=expected.get)
        assert w["prediction_text"] == next(c["text"] for c in w["scores"] if (c["start"], c["end"]) == top)
