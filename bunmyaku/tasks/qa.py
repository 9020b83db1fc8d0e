"""Extractive question answering (SQuAD 1.1 / 2.0): windows, span search, EM / F1.

A context longer than the model's window is cut into overlapping windows (``stride`` tokens shared
between neighbours; :func:`bunmyaku.tasks.windows.cut`, the question kept whole in each) so that every
answer lies whole inside at least one window. The model scores each token as a start and as an end; an
answer is the best-scoring valid span (inside the context, end not before start, at most
``max_answer_length`` tokens) across all windows of the example. SQuAD 2.0 adds "no answer": the [CLS]
span's score is the null score, and the example is unanswerable when no span
beats it by more than ``null_threshold``.
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from bunmyaku.data.tables import LINE, DataError, QAExample, read_squad, where
from bunmyaku.tasks.base import Task, model_inputs
from bunmyaku.tasks.metrics import squad_metrics
from bunmyaku.tasks.windows import INPUT_KEYS, cut

logger = logging.getLogger(__name__)


@dataclass
class QAFeatures:
    """Model inputs for the windows of a list of examples.

    ``inputs``: tensors (W, T) for W windows; ``example_index``: (W,) the example of each window;
    ``offsets``: per window and token, the [start, end) characters in the context, or None outside it.
    ``start_positions`` / ``end_positions``: (W,) training targets (0, the [CLS] token, when the answer is
    not inside the window or there is none).
    """

    inputs: dict[str, torch.Tensor]
    example_index: list[int]
    offsets: list[list[tuple[int, int] | None]]
    start_positions: torch.Tensor | None = None
    end_positions: torch.Tensor | None = None


def prepare_features(tokenizer, examples: list[QAExample], max_length: int = 384, stride: int = 128) -> QAFeatures:
    """Tokenize (question, context) pairs into overlapping windows over the context, with span targets.

    The windows are :func:`bunmyaku.tasks.windows.cut`'s (the question kept whole in each), padded to
    ``max_length``.

    Args:
        tokenizer: a ``bunmyaku.Tokenizer``.
        examples: the questions.
        max_length: tokens per window, question and special tokens included.
        stride: tokens shared by consecutive windows (lowered, with a warning, when the longest question leaves
            fewer context tokens per window).
    """
    windows = _windows(tokenizer, examples, max_length, stride)
    pad = {"input_ids": tokenizer.pad_token_id or 0, "attention_mask": 0, "token_type_ids": 0}
    inputs = {
        k: torch.tensor([w[k] + [pad[k]] * (max_length - len(w[k])) for w in windows])
        for k in INPUT_KEYS
        if k in windows[0]
    }
    offsets = [w["_offsets"] + [None] * (max_length - len(w["_offsets"])) for w in windows]
    spans = [_target_span(examples[w["example"]], o) for w, o in zip(windows, offsets, strict=True)]
    starts, ends = torch.tensor([a for a, _ in spans]), torch.tensor([b for _, b in spans])
    return QAFeatures(inputs, [w["example"] for w in windows], offsets, starts, ends)


def _windows(tokenizer, examples: list[QAExample], max_length: int, stride: int) -> list[dict[str, Any]]:
    questions, contexts = [e.question for e in examples], [e.context for e in examples]
    return cut(tokenizer, questions, contexts, max_length=max_length, strategy="windows", stride=stride)


def _target_span(example: QAExample, offsets: list[tuple[int, int] | None]) -> tuple[int, int]:
    """Token indices of the first answer inside this window, or (0, 0) when it is not wholly inside."""
    if example.is_impossible or not example.answers:
        return 0, 0
    answer = example.answers[0]
    char_start = answer["answer_start"]
    char_end = char_start + len(answer["text"])
    inside = [i for i, o in enumerate(offsets) if o is not None]
    if not inside or offsets[inside[0]][0] > char_start or offsets[inside[-1]][1] < char_end:
        return 0, 0
    start = next(i for i in inside if offsets[i][1] > char_start)
    end = next(i for i in reversed(inside) if offsets[i][0] < char_end)
    return start, end


def postprocess(
    examples: list[QAExample],
    features: QAFeatures,
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    n_best: int = 20,
    max_answer_length: int = 30,
    allow_impossible: bool = False,
    null_threshold: float = 0.0,
) -> list[dict[str, Any]]:
    """Turn window logits into one answer per example.

    Args:
        examples: the questions, in the order used by ``prepare_features``.
        features: their windows.
        start_logits / end_logits: (W, T) scores from the model.
        n_best: how many top starts and top ends to pair up in each window.
        max_answer_length: longest answer, in tokens.
        allow_impossible: SQuAD 2.0: answer "" when the null score wins.
        null_threshold: the best span must beat the null score by more than this to be answered.

    Returns:
        Per example ``{"id", "prediction_text", "score", "null_score", "candidates"}`` (the n-best list, each
        ``{"text", "score", "start", "end"}`` with character offsets into the context).
    """
    windows = collections.defaultdict(list)
    for w, example_idx in enumerate(features.example_index):
        windows[example_idx].append(w)
    start_logits, end_logits = start_logits.float().cpu(), end_logits.float().cpu()
    results = []
    for idx, example in enumerate(examples):
        candidates, null_score = [], float("inf")
        for w in windows[idx]:
            offsets = features.offsets[w]
            s_logits, e_logits = start_logits[w], end_logits[w]
            null_score = min(null_score, float(s_logits[0] + e_logits[0]))
            top_starts = s_logits.topk(min(n_best, len(s_logits))).indices.tolist()
            top_ends = e_logits.topk(min(n_best, len(e_logits))).indices.tolist()
            for s in top_starts:
                for e in top_ends:
                    if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    text = example.context[offsets[s][0] : offsets[e][1]]
                    score = float(s_logits[s] + e_logits[e])
                    candidates.append({"text": text, "score": score, "start": offsets[s][0], "end": offsets[e][1]})
        candidates.sort(key=lambda c: -c["score"])
        candidates = candidates[:n_best]
        best = candidates[0] if candidates else {"text": "", "score": float("-inf")}
        answer = best["text"]
        if allow_impossible and (not candidates or best["score"] <= null_score + null_threshold):
            answer = ""
        results.append(
            {
                "id": example.id,
                "prediction_text": answer,
                "score": best["score"],
                "null_score": null_score,
                "candidates": candidates,
            }
        )
    return results


# ------------------------------------------------------------------------------------------------
# The fine-tuning task


class QuestionAnswering(Task):
    """Extractive QA on SQuAD 1.1 / 2.0 JSON: windows with ``stride`` over long contexts, n-best spans of at most
    ``max_answer_length`` tokens, "no answer" past ``null_threshold`` (SQuAD 2.0: on when the training data has
    unanswerable questions). Metrics ``exact_match`` and ``f1`` (character F1 for Japanese), in percent."""

    name = "question-answering"
    head = "question-answering"
    metric = "f1"

    def __init__(self, settings: Any):
        super().__init__(settings)
        self.allow_impossible = False

    def read(self, path, labelled: bool = True) -> list[dict[str, Any]]:
        return [{"qa": example, LINE: example.id} for example in read_squad(path)]

    def read_records(self, records, labelled: bool = True) -> list[dict[str, Any]]:
        """Rows in the layout of Hugging Face's ``squad`` data sets: ``id``, ``question``, ``context``, and
        ``answers`` as ``{"text": [...], "answer_start": [...]}`` (or a list of ``{"text", "answer_start"}``);
        questions on one ``title`` (else one context) stay together in a held-out split. Examples already read
        (``{"qa": QAExample}``, as ``cv`` hands a fold's rows to ``finetune``) are taken as they are."""
        if all(isinstance(r.get("qa"), QAExample) for r in records):
            return records
        examples, articles = [], {}
        for r in records:
            at = where(r)
            for key in ("question", "context"):
                if not isinstance(r.get(key), str):
                    raise DataError(f"{at}: {key!r} must be a string, got {type(r.get(key)).__name__}")
            answers = _answers(r.get("answers"), at) if labelled else []
            for answer in answers:
                start, text = answer["answer_start"], answer["text"]
                if r["context"][start : start + len(text)] != text:
                    raise DataError(f"{at}: answer {text!r} is not at its answer_start {start}")
            article = articles.setdefault(r.get("title", r["context"]), len(articles))
            qid = str(r.get("id", r[LINE]))
            example = QAExample(qid, r["question"], r["context"], answers, not answers, article)
            examples.append({"qa": example, LINE: r[LINE]})
        return examples

    def gold(self, example):
        return [a["text"] for a in example["qa"].answers]

    def fit_labels(self, examples):
        self.allow_impossible = any(e["qa"].is_impossible for e in examples)

    def split_groups(self, examples):
        return [e["qa"].article for e in examples]

    def group_value(self, example, column):
        """A flat column of in-memory rows is gone once read: ``title`` (or ``article``) is the question's article
        (its SQuAD ``data`` entry; for rows, its title, else its context) and ``context`` its paragraph."""
        qa = example["qa"]
        if column in ("title", "article"):
            return qa.article
        if column == "context":
            return qa.context
        return example.get(column)

    def num_labels(self) -> int | None:
        return None

    def encode(self, tokenizer, examples, labelled=True, source=""):
        qa_examples = [e["qa"] for e in examples]
        features = []
        for window in _windows(tokenizer, qa_examples, self.settings.max_length, self.settings.stride):
            feature = {k: window[k] for k in INPUT_KEYS if k in window}
            feature.update(example=window["example"], _offsets=window["_offsets"])
            if labelled:
                start, end = _target_span(qa_examples[window["example"]], window["_offsets"])
                feature.update(start_positions=start, end_positions=end)
            features.append(feature)
        return features

    def forward(self, model, batch):
        out = model(**model_inputs(batch))
        return out.loss, torch.stack([out.start_logits, out.end_logits], dim=1).detach()  # (B, 2, T)

    def _answers(self, examples, features, outputs) -> list[dict[str, Any]]:
        s = self.settings
        T = max(len(f["_offsets"]) for f in features)
        logits = torch.full((len(features), 2, T), -1e4)
        for w, out in enumerate(outputs):
            n = len(features[w]["_offsets"])
            logits[w, :, :n] = out[:, :n].float()
        windows = QAFeatures({}, [f["example"] for f in features], [f["_offsets"] + [None] * T for f in features])
        return postprocess(
            [e["qa"] for e in examples],
            windows,
            logits[:, 0],
            logits[:, 1],
            n_best=s.n_best,
            max_answer_length=s.max_answer_length,
            allow_impossible=self.allow_impossible,
            null_threshold=s.null_threshold,
        )

    def metrics(self, examples, features, outputs):
        return squad_metrics(self._answers(examples, features, outputs), [e["qa"] for e in examples])

    def predictions(self, examples, features, outputs):
        answers = self._answers(examples, features, outputs)
        return [
            {
                "id": a["id"],
                "question": e["qa"].question,
                "prediction_text": a["prediction_text"],
                # no valid span among the n-best starts and ends: no score (JSON has no -inf)
                "score": a["score"] if math.isfinite(a["score"]) else None,
            }
            for a, e in zip(answers, examples, strict=True)
        ]

    def state(self):
        return {"labels": None, "allow_impossible": self.allow_impossible}

    def load_state(self, state):
        self.allow_impossible = bool(state.get("allow_impossible", False))


def _answers(value: Any, at: str) -> list[dict[str, Any]]:
    """``{"text": [...], "answer_start": [...]}`` or ``[{"text", "answer_start"}]`` -> a list of answers."""
    if isinstance(value, dict):
        texts, starts = value.get("text", []), value.get("answer_start", [])
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise DataError(f"{at}: 'answers' needs 'text' and 'answer_start' lists of one length")
        value = [{"text": t, "answer_start": a} for t, a in zip(texts, starts, strict=True)]
    if not isinstance(value, list):
        raise DataError(f"{at}: 'answers' must be a list of answers or a dict of lists, got {type(value).__name__}")
    answers = []
    for answer in value:
        text, start = (answer.get("text"), answer.get("answer_start")) if isinstance(answer, dict) else (None, None)
        if not isinstance(text, str) or isinstance(start, bool) or not isinstance(start, int):
            raise DataError(f"{at}: an answer needs a 'text' string and an 'answer_start' character offset: {answer}")
        answers.append({"text": text, "answer_start": start})
    return answers
