"""text-classification against transformers' pipeline on random BERT heads (single-label, multi-label, regression)."""

from __future__ import annotations

import pytest

import bunmyaku
from tests.conftest import require_module
from tests.pipelines.tiny_models import bert_head_dir

transformers = require_module("transformers")

TEXTS = ["I loved this film.", "A dull, far too long and badly acted movie that nobody should see.", "ok"]
HEADS = {
    "single_label_classification": dict(id2label={0: "negative", 1: "neutral", 2: "positive"}),
    "multi_label_classification": dict(id2label={0: "sports", 1: "politics", 2: "tech", 3: "art"}),
    "regression": dict(num_labels=1),
}


@pytest.fixture(scope="module", params=list(HEADS))
def classifier_dir(request, minilm_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return bert_head_dir(
        path, minilm_dir, "BertForSequenceClassification", problem_type=request.param, **HEADS[request.param]
    )


def test_scores_match_transformers(classifier_dir):
    ours = bunmyaku.pipeline("text-classification", model=classifier_dir, device="cpu")
    theirs = transformers.pipeline("text-classification", model=str(classifier_dir), device="cpu")
    got = ours(TEXTS, top_k=None)
    for text, result in zip(TEXTS, got, strict=True):
        expected = theirs(text, top_k=None)
        assert [r["label"] for r in result] == [e["label"] for e in expected]
        for a, b in zip(result, expected, strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
    # the default top_k=1 is the best label; one text gives one list
    (best,) = ours(TEXTS[0])
    assert best["label"] == got[0][0]["label"] and best["score"] == pytest.approx(got[0][0]["score"], abs=1e-5)


def test_softmax_sums_to_one_and_pairs(minilm_dir, tmp_path):
    path = bert_head_dir(tmp_path, minilm_dir, "BertForSequenceClassification", **HEADS["single_label_classification"])
    pipe = bunmyaku.pipeline("text-classification", model=path, device="cpu", batch_size=2)
    scores = pipe(TEXTS, top_k=None)
    assert all(sum(r["score"] for r in result) == pytest.approx(1.0, abs=1e-5) for result in scores)
    assert [len(r) for r in pipe(TEXTS, top_k=2)] == [2, 2, 2]
    # batching sorted by length gives what one-at-a-time gives
    for text, result in zip(TEXTS, scores, strict=True):
        assert [r["label"] for r in pipe(text, top_k=None)] == [r["label"] for r in result]
    paired = pipe("A man is eating.", text_pair="Someone eats.", top_k=None)
    assert paired != pipe("A man is eating.", top_k=None)
    with pytest.raises(ValueError, match="text pairs"):
        pipe(["a", "b"], text_pair=["c"])
