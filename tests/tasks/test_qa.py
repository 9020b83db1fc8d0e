"""QA windows and span search on hand-built cases, and the SQuAD metrics."""

from __future__ import annotations

import pytest
import torch

import bunmyaku
from bunmyaku.data.tables import QAExample
from bunmyaku.tasks.metrics import exact_match, f1_score, squad_metrics
from bunmyaku.tasks.qa import postprocess, prepare_features

FILLER = " ".join(f"word{i}" for i in range(120))
CONTEXT = f"{FILLER} The treasure is buried under the old oak tree near the river. {FILLER}"
ANSWER = "under the old oak tree"


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return bunmyaku.Tokenizer.from_pretrained(minilm_dir)


def _example(**kw):
    start = CONTEXT.index(ANSWER)
    base = dict(
        id="q1", question="Where is the treasure?", context=CONTEXT, answers=[{"text": ANSWER, "answer_start": start}]
    )
    return QAExample(**{**base, **kw})


def _logits_for(features, window, start, end, T):
    s = torch.full((len(features.example_index), T), -10.0)
    e = torch.full((len(features.example_index), T), -10.0)
    s[window, start], e[window, end] = 5.0, 5.0
    return s, e


def test_windows_overlap_and_targets_point_at_the_answer(tokenizer):
    example = _example()
    features = prepare_features(tokenizer, [example], max_length=64, stride=16)
    assert len(features.example_index) > 3  # the context is cut into several windows
    hits = [w for w, s in enumerate(features.start_positions.tolist()) if s != 0]
    assert hits, "some window must contain the answer"
    for w in range(len(features.example_index)):
        s, e = features.start_positions[w].item(), features.end_positions[w].item()
        if w in hits:
            a, b = features.offsets[w][s][0], features.offsets[w][e][1]
            assert CONTEXT[a:b] == ANSWER
        else:
            assert (s, e) == (0, 0)


def test_answer_is_found_in_a_later_window(tokenizer):
    example = _example()
    features = prepare_features(tokenizer, [example], max_length=64, stride=16)
    w = max(i for i, s in enumerate(features.start_positions.tolist()) if s != 0)
    T = features.inputs["input_ids"].shape[1]
    s, e = _logits_for(features, w, features.start_positions[w], features.end_positions[w], T)
    [pred] = postprocess([example], features, s, e)
    assert pred["prediction_text"] == ANSWER
    assert squad_metrics([pred], [example]) == {"exact_match": 100.0, "f1": 100.0}


def test_unanswerable_and_too_long(tokenizer):
    example = _example(answers=[], is_impossible=True)
    features = prepare_features(tokenizer, [example], max_length=64, stride=16)
    T = features.inputs["input_ids"].shape[1]
    w, first = 1, next(i for i, o in enumerate(features.offsets[1]) if o is not None)
    s, e = _logits_for(features, w, first, first + 2, T)
    s[:, 0], e[:, 0] = 6.0, 6.0  # the null span scores highest
    assert postprocess([example], features, s, e, allow_impossible=True)[0]["prediction_text"] == ""
    assert postprocess([example], features, s, e, allow_impossible=False)[0]["prediction_text"] != ""
    # a span beyond max_answer_length loses to a shorter, weaker one
    s2, e2 = _logits_for(features, w, first, first + 20, T)
    e2[w, first + 1] = 4.0
    pred = postprocess([example], features, s2, e2, max_answer_length=10)[0]
    a, b = features.offsets[w][first][0], features.offsets[w][first + 1][1]
    assert pred["prediction_text"] == CONTEXT[a:b]


def test_metrics():
    assert exact_match("The Oak Tree!", "oak tree") == 1.0
    assert f1_score("under the oak", "under the old oak tree") == pytest.approx(2 * (2 / 2) * (2 / 4) / (1 + 0.5))
    assert f1_score("東京都", "東京") == pytest.approx(0.8)  # characters, not words, for Japanese
    assert f1_score("", "") == 1.0 and f1_score("x", "") == 0.0


def test_held_out_split_keeps_each_article_together(tmp_path):
    import json

    from bunmyaku.tasks.finetune import FinetuneArgs, build_task, split_examples

    def paragraph(a, p, n):
        return {"context": f"c{a}{p}", "qas": [{"id": f"{a}-{p}-{q}", "question": "q"} for q in range(n)]}

    articles = [{"paragraphs": [paragraph(a, 0, 2), paragraph(a, 1, 1)]} for a in range(10)]
    (tmp_path / "s.json").write_text(json.dumps({"data": articles}))
    task = build_task(FinetuneArgs(task="question-answering"))
    examples = task.read(tmp_path / "s.json")
    kept, held = split_examples(examples, task.split_groups(examples), 0.3, seed=0)
    article_of = {e["qa"].id: e["qa"].article for e in examples}
    held_articles = {article_of[e["qa"].id] for e in held}
    assert len(held_articles) == 3 and len(held) == 9  # 3 articles, each with its 3 questions
    assert not held_articles & {article_of[e["qa"].id] for e in kept}
