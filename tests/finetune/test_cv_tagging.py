"""bunmyaku cv for token classification, CoNLL (tags per word) and span (entities over characters) data: the oof
contract, group folds, seqeval metrics recomputed from oof.jsonl, seed averages against each fold model loaded in
`transformers`, entities decoded from the averaged character scores, and ensembles (mean only)."""

from __future__ import annotations

import json

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
from tests.finetune.helpers import NAMES, PLACES, ner_records


def conll_rows(n, seed=0):
    """Word-tagged sentences (PER, LOC), two per document."""
    rows = []
    for i, record in enumerate(ner_records(n, seed)):
        tokens = record["text"].split()
        tags = ["B-PER" if t in NAMES else "B-LOC" if t in PLACES else "O" for t in tokens]
        rows.append({"tokens": tokens, "tags": tags, "doc": f"d{i // 2}"})
    return rows


@pytest.fixture(scope="module")
def conll_run(tmp_path_factory, tiny_bert_dir):
    out = tmp_path_factory.mktemp("cv-conll") / "run"
    bunmyaku.cv(
        **FAST,
        task="token-classification",
        format="conll",
        model=tiny_bert_dir,
        train=conll_rows(12),
        test=conll_rows(3, seed=7),
        folds=2,
        seeds="0,1",
        group_column="doc",
        output_dir=out,
    )
    return out


@pytest.fixture(scope="module")
def span_run(tmp_path_factory, tiny_bert_dir):
    out = tmp_path_factory.mktemp("cv-spans") / "run"
    settings = {"task": "token-classification", "format": "spans", "label_column": "entities"}
    data = {"train": ner_records(12), "test": ner_records(3, seed=7)}
    bunmyaku.cv(**FAST, **settings, model=tiny_bert_dir, **data, folds=2, seeds="0,1", output_dir=out)
    return out


def token_probabilities(model_dir, texts, split):
    """`transformers` as the oracle: per token the softmax over the tags, with the tokenizer's word ids and
    character offsets."""
    transformers, torch = require_module("transformers"), require_module("torch")
    model = transformers.AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    out = []
    for text in texts:
        batch = tokenizer(text, is_split_into_words=split, return_tensors="pt", return_offsets_mapping=True)
        offsets = batch.pop("offset_mapping")[0].tolist()
        with torch.no_grad():
            probs = model(**batch).logits[0].softmax(-1).double().numpy()
        out.append((probs, batch.word_ids(0), offsets))
    return out


def word_scores(model_dir, rows):
    scores = []
    tokens = token_probabilities(model_dir, [r["tokens"] for r in rows], True)
    for (probs, words, _), row in zip(tokens, rows, strict=True):
        per_word = [None] * len(row["tokens"])
        for t, w in enumerate(words):
            if w is not None and per_word[w] is None:  # a word's first token
                per_word[w] = probs[t]
        scores.append(per_word)
    return scores


def char_scores(model_dir, rows):
    scores = []
    tokens = token_probabilities(model_dir, [r["text"] for r in rows], False)
    for (probs, words, offsets), row in zip(tokens, rows, strict=True):
        per_char = [None] * len(row["text"])
        for t, (start, end) in enumerate(offsets):
            if words[t] is not None:
                for c in range(start, end):
                    per_char[c] = probs[t]
        scores.append(per_char)
    return scores


def assert_units_close(written, expected):
    assert len(written) == len(expected)
    for a, b in zip(written, expected, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(a, b, atol=1e-6)


def id2label(run):
    config = json.loads((run / "fold0" / "seed0" / "model" / "config.json").read_text())
    return [config["id2label"][str(i)] for i in range(len(config["id2label"]))]


def seqeval_metrics(gold, predicted):
    seqeval = require_module("seqeval.metrics")
    flat = [(g, p) for gs, ps in zip(gold, predicted, strict=True) for g, p in zip(gs, ps, strict=True)]
    return {
        "precision": seqeval.precision_score(gold, predicted),
        "recall": seqeval.recall_score(gold, predicted),
        "f1": seqeval.f1_score(gold, predicted),
        "accuracy": np.mean([g == p for g, p in flat]),
    }


def char_bio(text, entities):
    tags = ["O"] * len(text)
    for e in entities:
        tags[e["start"] : e["end"]] = [f"B-{e['type']}"] + [f"I-{e['type']}"] * (e["end"] - e["start"] - 1)
    return tags


def decode_characters(text, units, names):
    """The decoding rule written out: per character the argmax tag; B-X opens an entity unless the character
    before it is B-X too (one token's characters); I-X continues an open X entity, else opens one; O closes;
    characters without scores are skipped."""
    entities, open_, previous = [], None, None
    for c, unit in enumerate(units):
        if unit is None:
            previous = None
            continue
        tag = names[int(np.argmax(unit))]
        if tag == "O":
            open_ = None
        elif tag.startswith("B-") and not (previous == tag and open_ is not None):
            open_ = {"start": c, "end": c + 1, "type": tag[2:]}
            entities.append(open_)
        elif open_ is not None and open_["type"] == tag[2:]:
            open_["end"] = c + 1
        else:
            open_ = {"start": c, "end": c + 1, "type": tag[2:]}
            entities.append(open_)
        previous = tag
    return [{**e, "text": text[e["start"] : e["end"]]} for e in entities]


def test_conll_oof_contract_groups_and_metrics(conll_run):
    rows = conll_rows(12)
    oof = check_rows_and_folds(conll_run, len(rows))
    check_groups_kept(oof, [r["doc"] for r in rows])
    names = id2label(conll_run)
    for record, row in zip(oof, rows, strict=True):
        assert record["tokens"] == row["tokens"] and record["gold"] == row["tags"]
        assert len(record["scores"]) == len(row["tokens"])
        assert all(sum(u) == pytest.approx(1.0, abs=1e-6) for u in record["scores"])
        assert record["tags"] == [names[int(np.argmax(u))] for u in record["scores"]]  # decoded from the average
    assert len({t for r in oof for t in r["tags"]}) > 1  # not one constant tag: the metrics below can tell
    written = json.loads((conll_run / "metrics.json").read_text())
    expected = seqeval_metrics([r["gold"] for r in oof], [r["tags"] for r in oof])
    assert written == pytest.approx(expected, abs=1e-9)
    check_fold_metrics(conll_run, lambda held: seqeval_metrics([r["gold"] for r in held], [r["tags"] for r in held]))


def test_conll_seed_average_test_predictions_and_fold_models(conll_run):
    rows, test = conll_rows(12), conll_rows(3, seed=7)
    oof = read_jsonl(conll_run / "oof.jsonl")
    models = {(k, s): conll_run / f"fold{k}" / f"seed{s}" / "model" for k in (0, 1) for s in (0, 1)}
    for k in (0, 1):
        held = [row for row, r in zip(rows, oof, strict=True) if r["fold"] == k]
        seeds = [word_scores(models[k, s], held) for s in (0, 1)]
        assert not np.allclose(seeds[0][0][0], seeds[1][0][0], atol=1e-6, rtol=0)  # two different models
        expected = [[(a + b) / 2 for a, b in zip(x, y, strict=True)] for x, y in zip(*seeds, strict=True)]
        for record, units in zip([r for r in oof if r["fold"] == k], expected, strict=True):
            assert_units_close(record["scores"], units)
    runs = [word_scores(m, test) for m in models.values()]
    written = read_jsonl(conll_run / "test_predictions.jsonl")
    for i, record in enumerate(written):
        expected = [np.mean([run[i][w] for run in runs], axis=0) for w in range(len(test[i]["tokens"]))]
        assert_units_close(record["scores"], expected)
    test_metrics = json.loads((conll_run / "test_metrics.json").read_text())
    assert test_metrics == pytest.approx(seqeval_metrics([t["tags"] for t in test], [w["tags"] for w in written]))


def test_span_oof_contract_decoding_and_metrics(span_run):
    rows = ner_records(12)
    oof = check_rows_and_folds(span_run, len(rows))
    names = id2label(span_run)
    for record, row in zip(oof, rows, strict=True):
        assert record["text"] == row["text"] and len(record["scores"]) == len(row["text"])
        assert [(g["start"], g["end"], g["type"]) for g in record["gold"]] == [
            (*e["span"], e["type"]) for e in row["entities"]
        ]
        assert [c for c, u in enumerate(record["scores"]) if u is None] == [
            c for c, ch in enumerate(row["text"]) if ch == " "
        ]  # every word is one token here: only the spaces are not covered
        assert record["entities"] == decode_characters(record["text"], record["scores"], names)
    assert any(r["entities"] for r in oof)
    written = json.loads((span_run / "metrics.json").read_text())
    gold = [char_bio(r["text"], r["gold"]) for r in oof]
    predicted = [char_bio(r["text"], r["entities"]) for r in oof]
    assert written == pytest.approx(seqeval_metrics(gold, predicted), abs=1e-9)

    def on(held):
        gold = [char_bio(r["text"], r["gold"]) for r in held]
        return seqeval_metrics(gold, [char_bio(r["text"], r["entities"]) for r in held])

    check_fold_metrics(span_run, on)


def test_span_seed_average_against_the_fold_models(span_run):
    rows = ner_records(12)
    oof = read_jsonl(span_run / "oof.jsonl")
    for k in (0, 1):
        held = [row for row, r in zip(rows, oof, strict=True) if r["fold"] == k]
        seeds = [char_scores(span_run / f"fold{k}" / f"seed{s}" / "model", held) for s in (0, 1)]
        for record, a, b in zip([r for r in oof if r["fold"] == k], *seeds, strict=True):
            expected = [None if x is None else (x + y) / 2 for x, y in zip(a, b, strict=True)]
            assert_units_close(record["scores"], expected)


def test_character_tags_to_entities():
    from bunmyaku.tasks.averaging import tags_to_entities

    per, loc = ["B-PER"] * 4, ["B-LOC"] * 3
    # two B-PER tokens apart: two entities; B then I of one type: one; a type change: a new one
    assert [e["text"] for e in tags_to_entities("taro hana", per + [None] + per)] == ["taro", "hana"]
    assert tags_to_entities("new york", ["B-LOC"] * 3 + [None] + ["I-LOC"] * 4) == [
        {"start": 0, "end": 8, "type": "LOC", "text": "new york"}
    ]
    assert [e["type"] for e in tags_to_entities("abcxyz", loc + ["I-PER"] * 3)] == ["LOC", "PER"]
    assert tags_to_entities("ab c", ["O", "O", None, "I-LOC"]) == [{"start": 3, "end": 4, "type": "LOC", "text": "c"}]


def test_tagging_ensembles(conll_run, span_run, tmp_path):
    from bunmyaku.tasks.ensemble import ensemble

    check_ensemble_of_one_run(conll_run, tmp_path / "conll")
    check_ensemble_of_one_run(span_run, tmp_path / "spans")
    check_mismatched_runs_refused(conll_run, None, tmp_path)
    with pytest.raises(ValueError, match="do not share the gold labels: row 0"):
        ensemble([conll_run, span_run], tmp_path / "mixed")
    for method in ("rank", "weighted", "stacking"):
        refused = rf"--method {method} does not apply to token-classification.*use --method mean"
        with pytest.raises(ValueError, match=refused):
            ensemble([conll_run, conll_run], tmp_path / method, method=method)
    written = read_jsonl(tmp_path / "spans" / "ensemble-mean" / "test_predictions.jsonl")
    assert written == read_jsonl(span_run / "test_predictions.jsonl")


def test_fold_models_load_in_transformers(conll_run):
    transformers = require_module("transformers")
    model = transformers.AutoModelForTokenClassification.from_pretrained(conll_run / "fold1" / "seed1" / "model")
    assert model.config.num_labels == len(id2label(conll_run)) == 5


def test_ensemble_mean_of_two_runs_averages_and_decodes(span_run, tmp_path):
    names = id2label(span_run)
    run, changed, written = ensemble_with_changed_copy(
        span_run, tmp_path, lambda units: [None if u is None else u[::-1] for u in units]
    )
    for a, b, w in zip(run, changed, written, strict=True):
        expected = [None if x is None else (np.array(x) + y) / 2 for x, y in zip(a["scores"], b["scores"], strict=True)]
        assert_units_close(w["scores"], expected)
        assert w["entities"] == decode_characters(w["text"], w["scores"], names)
    assert [w["entities"] for w in written] != [r["entities"] for r in run]  # the copy's scores changed them


@pytest.mark.parametrize("label_all_tokens", [False, True])
def test_later_sub_tokens_score_as_finetune_tags_them(label_all_tokens):
    torch = require_module("torch")
    from bunmyaku.tasks.averaging import example_scores
    from bunmyaku.tasks.finetune import FinetuneArgs, build_task

    settings = FinetuneArgs(task="token-classification", format="spans", label_all_tokens=label_all_tokens)
    task = build_task(settings)
    task.labels = ["O", "B-PER", "I-PER"]
    # [CLS] hana ##ko ok [SEP] over "hanako ok"
    feature = {
        "_first": [False, True, False, True, False],
        "_words": [None, 0, 0, 1, None],
        "_offsets": [None, (0, 4), (4, 6), (7, 9), None],
    }
    probs = torch.tensor([[1, 0, 0], [0.2, 0.7, 0.1], [0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [1, 0, 0]])
    [units] = example_scores(task, [{"text": "hanako ok"}], [feature], [probs])
    # trained on first sub-tokens only, "##ko" takes "hana"'s probabilities with B-PER's mass moved to I-PER (the
    # continuation finetune predicts); trained on every sub-token, its own
    later = [0.9, 0.05, 0.05] if label_all_tokens else [0.2, 0.0, 0.8]
    expected = [[0.2, 0.7, 0.1]] * 4 + [later] * 2 + [None] + [[0.6, 0.3, 0.1]] * 2
    assert_units_close(units, expected)
