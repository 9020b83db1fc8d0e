"""question-answering against transformers' model and tokenizer on a random BERT QA head.

transformers 5 has no question-answering pipeline, so the reference is computed here from its model's
logits and its tokenizer's windows by brute force: every span of every window, scored p(start) * p(end)
with both distributions taken over the context tokens and [CLS].
"""

from __future__ import annotations

import pytest
import torch

import bunmyaku
from tests.conftest import require_module
from tests.pipelines.tiny_models import bert_head_dir

transformers = require_module("transformers")

CONTEXT = (
    "The Transformer was introduced in 2017 by researchers at Google. It relies entirely on attention. "
    "BERT followed in 2018 and was pretrained with masked language modelling on books and Wikipedia. "
    "東京は日本の首都であり、人口は約1400万人です。"
)
QUESTIONS = ["When was the Transformer introduced?", "What was BERT pretrained on?", "日本の首都はどこですか？"]


@pytest.fixture(scope="module")
def qa_dir(minilm_dir, tmp_path_factory):
    return bert_head_dir(tmp_path_factory.mktemp("qa"), minilm_dir, "BertForQuestionAnswering", seed=2)


def reference(qa_dir, question, context, max_length, stride, max_answer_len, impossible):
    """The best answer by exhaustive search over transformers' windows and logits."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(qa_dir)
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(qa_dir).eval()
    enc = tokenizer(
        question,
        context,
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, token_type_ids=enc.token_type_ids)
    best = {"answer": "", "score": -1.0, "start": 0, "end": 0}
    null = float("inf")
    for w in range(enc.input_ids.size(0)):
        in_context = torch.tensor([s == 1 for s in enc.sequence_ids(w)])
        allowed = in_context.clone()
        allowed[0] = True  # [CLS]
        p_start = out.start_logits[w].masked_fill(~allowed, -torch.inf).softmax(-1)
        p_end = out.end_logits[w].masked_fill(~allowed, -torch.inf).softmax(-1)
        null = min(null, float(p_start[0] * p_end[0]))
        context_positions = in_context.nonzero().flatten().tolist()
        for s in context_positions:
            for e in context_positions:
                score = float(p_start[s] * p_end[e])
                if s <= e < s + max_answer_len and score > best["score"]:
                    start, end = int(enc.offset_mapping[w, s, 0]), int(enc.offset_mapping[w, e, 1])
                    best = {"answer": context[start:end], "score": score, "start": start, "end": end}
    if impossible and null > best["score"]:
        return {"answer": "", "score": null, "start": 0, "end": 0}
    return best


@pytest.mark.parametrize(
    "max_length, stride, max_answer_len, impossible", [(384, 128, 15, False), (40, 10, 5, False), (48, 16, 30, True)]
)
def test_answers_match_brute_force_over_transformers(qa_dir, max_length, stride, max_answer_len, impossible):
    pipe = bunmyaku.pipeline(
        "question-answering",
        model=qa_dir,
        device="cpu",
        max_length=max_length,
        stride=stride,
        max_answer_len=max_answer_len,
        handle_impossible_answer=impossible,
        batch_size=3,
    )
    got = pipe(QUESTIONS, CONTEXT)
    for question, answer in zip(QUESTIONS, got, strict=True):
        expected = reference(qa_dir, question, CONTEXT, max_length, stride, max_answer_len, impossible)
        assert (answer["answer"], answer["start"], answer["end"]) == (
            expected["answer"],
            expected["start"],
            expected["end"],
        )
        assert answer["score"] == pytest.approx(expected["score"], rel=1e-4, abs=1e-7)
        assert CONTEXT[answer["start"] : answer["end"]] == answer["answer"]


def test_top_k_and_errors(qa_dir):
    pipe = bunmyaku.pipeline("question-answering", model=qa_dir, device="cpu", max_length=48, stride=16)
    answers = pipe(QUESTIONS[0], CONTEXT, top_k=4)
    assert len(answers) == 4 and answers[0] == pipe(QUESTIONS[0], CONTEXT)
    assert all(a["score"] >= b["score"] for a, b in zip(answers, answers[1:], strict=False))
    assert all(CONTEXT[a["start"] : a["end"]] == a["answer"] for a in answers)
    with pytest.raises(ValueError, match="contexts"):
        pipe(QUESTIONS, [CONTEXT])
