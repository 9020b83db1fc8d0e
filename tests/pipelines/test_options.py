"""Every pipeline refuses an out-of-range count up front, naming the option, before loading anything."""

from __future__ import annotations

import pytest

import bunmyaku

CASES = [
    ("text-classification", {"batch_size": 0}),
    ("text-classification", {"top_k": 0}),
    ("text-classification", {"max_length": 0}),
    ("question-answering", {"batch_size": 0}),
    ("question-answering", {"max_answer_len": 0}),
    ("question-answering", {"stride": -1}),
    ("sentence-similarity", {"batch_size": 0}),
    ("token-classification", {"batch_size": -2}),
    ("translation", {"batch_size": 0}),
    ("fill-mask", {"top_k": 0}),
]


@pytest.mark.parametrize(("task", "options"), CASES, ids=[f"{t}-{next(iter(o))}" for t, o in CASES])
def test_bad_counts_are_refused_by_name(task, options, tmp_path):
    (name, value) = next(iter(options.items()))
    # the model does not exist: the option is checked first, so its message, not the path's, comes back
    with pytest.raises(ValueError, match=f"{name} must be an integer >= {0 if name == 'stride' else 1}, got {value}"):
        bunmyaku.pipeline(task, model=tmp_path / "missing", device="cpu", **options)


def test_call_options_are_checked(minilm_dir, tmp_path):
    from tests.pipelines.tiny_models import bert_head_dir

    path = bert_head_dir(tmp_path / "cls", minilm_dir, "BertForSequenceClassification")
    classify = bunmyaku.pipeline("text-classification", model=path, device="cpu")
    with pytest.raises(ValueError, match="top_k must be an integer >= 1, got 0"):
        classify("text", top_k=0)
    assert len(classify("text", top_k=None)) == 2  # None still means every label
    similarity = bunmyaku.pipeline("sentence-similarity", model=path, device="cpu", batch_size=1)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1, got 0"):
        similarity.search(["q"], ["a", "b"], top_k=0)
    # batches of one, sorted by length, give the same embeddings as one batch, in the input order
    sentences = ["a b c d e", "a", "a b c"]
    one_batch = bunmyaku.pipeline("sentence-similarity", model=path, device="cpu", batch_size=8)
    assert similarity.encode(sentences).allclose(one_batch.encode(sentences), atol=1e-5)
