"""Scores that average: what ``cv`` writes per example as ``scores``, how several models' scores average, and how
averaged scores decode back into predictions. The one implementation behind ``cv``'s seed and fold averaging and
``ensemble --method mean``.

Each task family has a *kind* of score (one JSON value per example):

- ``probabilities`` (single-label classification, multiple choice): the probability of every class (choice) in
  id2label (choice) order, a softmax; averaged element-wise; the prediction is the argmax.
- ``multi-label``: every class's sigmoid probability; averaged element-wise; the prediction is every p > 0.5.
- ``value`` (regression, bi-encoder similarity): the predicted value (the cosine for a bi-encoder); averaged.
- ``tags`` (token classification): per unit a list of probabilities over id2label, or null. The units are the
  words for CoNLL data (the probabilities of each word's first token; null for a word the window cut off) and the
  characters of the text for span data (the probabilities of the token covering the character; null for
  characters no token covers, such as spaces). Averaged element-wise over the models that score the unit; each
  unit's tag is its argmax; span data decodes character tags into entities with :func:`tags_to_entities`.
- ``answers`` (extractive QA): the n-best answers ``[{"start", "end", "text", "probability"}]`` (character offsets
  into the context), probabilities normalised over the candidates and, when the data has unanswerable questions,
  the null answer ``{"start": -1, "end": -1, "text": ""}``. Averaging merges candidates by (start, end) and
  adds their probabilities (a candidate missing from one model counts 0 there) divided by the number of models;
  the prediction is the most probable merged candidate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bunmyaku.tasks.ner import OUTSIDE, group_tags, split_tag

KINDS = ("probabilities", "multi-label", "value", "tags", "answers")
NULL_ANSWER = {"start": -1, "end": -1, "text": ""}


def kind_of(task: Any) -> str:
    """The kind of score a task's examples get (see the module docstring)."""
    name = task.name
    if name in ("multiple-choice", "pair-classification"):
        return "probabilities"
    if name == "sentence-embedding":
        return "value"
    if name == "token-classification":
        return "tags"
    if name == "question-answering":
        return "answers"
    problem = getattr(task, "problem", None)
    if problem == "regression":
        return "value"
    if problem == "multi-label":
        return "multi-label"
    return "probabilities"


def average(kind: str, runs: Sequence[Sequence[Any]]) -> list[Any]:
    """Per example, the average of several models' scores.

    Args:
        kind: one of :data:`KINDS`.
        runs: per model, its scores of the same examples in the same order.

    Returns:
        The averaged scores, one per example, in the format of one model's.

    Raises:
        ValueError: runs of different lengths, or per-example scores of different shapes.
    """
    if len(runs) == 0:  # runs may be an (R, N, C) array
        raise ValueError("nothing to average: no model's scores")
    count = len(runs[0])
    if any(len(run) != count for run in runs):
        raise ValueError(f"cannot average scores of {sorted({len(r) for r in runs})} examples: the runs differ")
    if kind == "answers":
        return [_merge_answers([run[i] for run in runs]) for i in range(count)]
    if kind == "tags":
        return [_mean_units([run[i] for run in runs], i) for i in range(count)]
    if kind not in KINDS:
        raise ValueError(f"unknown score kind {kind!r}; expected one of {KINDS}")
    stacked = np.asarray([[run[i] for i in range(count)] for run in runs], dtype=np.float64)
    return stacked.mean(axis=0).tolist()


def _mean_units(per_model: list[list[Any]], example: int) -> list[Any]:
    lengths = {len(units) for units in per_model}
    if len(lengths) != 1:
        raise ValueError(f"example {example}: the models score {sorted(lengths)} units (words or characters)")
    out = []
    for unit in zip(*per_model, strict=True):
        scored = [u for u in unit if u is not None]
        out.append(np.mean(np.asarray(scored, dtype=np.float64), axis=0).tolist() if scored else None)
    return out


def _merge_answers(per_model: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    merged: dict[tuple[int, int], dict[str, Any]] = {}
    for candidates in per_model:
        for c in candidates:
            key = (int(c["start"]), int(c["end"]))
            entry = merged.setdefault(key, {"start": key[0], "end": key[1], "text": c["text"], "probability": 0.0})
            entry["probability"] += float(c["probability"])
    out = [{**c, "probability": c["probability"] / len(per_model)} for c in merged.values()]
    return sorted(out, key=lambda c: (-c["probability"], c["start"], c["end"]))


# ------------------------------------------------------------------------------------------------
# Scores from one model's outputs


def tag_probabilities(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per token the softmax over the tags: (B, T, L), for :func:`example_scores` on token classification."""
    from bunmyaku.tasks.base import model_inputs

    return model(**model_inputs(batch)).logits.float().softmax(-1)


def example_scores(task: Any, examples: list[dict[str, Any]], features: list[dict[str, Any]], outputs: list[Any]):
    """One model's scores per example, from the task's per-feature outputs (for token classification, the tag
    probabilities of :func:`tag_probabilities` instead of the task's argmax).

    Returns:
        A list with one JSON-serialisable score per example (see the module docstring).
    """
    kind = kind_of(task)
    if kind == "answers":
        return answer_candidates(task, examples, features, outputs)
    if kind == "tags":
        return _unit_probabilities(task, examples, features, outputs)
    if task.name == "sentence-embedding":
        return [float(o[0]) for o in outputs]
    logits = torch.stack([o.float() for o in outputs])
    if kind == "probabilities":
        return logits.softmax(-1).double().tolist()
    if kind == "multi-label":
        return logits.sigmoid().double().tolist()
    return logits[:, 0].double().tolist()


def _unit_probabilities(task, examples, features, outputs) -> list[list[Any]]:
    names = task.labels or []
    # a later sub-token is not trained unless label_all_tokens: it continues its word's first token's tag
    continued = [names.index(f"I-{split_tag(n)[1]}") if n.startswith("B-") else j for j, n in enumerate(names)]
    scores = []
    features, outputs = task.documents(examples, features, outputs)  # one per example (windows merged)
    for example, feature, probs in zip(examples, features, outputs, strict=True):
        rows: list[list[float] | None] = []
        first_row = None
        for t, (is_first, w) in enumerate(zip(feature["_first"], feature["_words"], strict=True)):
            row = probs[t].double()
            if w is not None and is_first:
                first_row = row
            elif w is not None and not task.settings.label_all_tokens and first_row is not None:
                row = torch.zeros_like(first_row).index_add_(0, torch.tensor(continued), first_row)
            rows.append(row.tolist() if w is not None else None)
        if task.conll:
            units: list[Any] = [None] * len(example["tokens"])
            for row, is_first, w in zip(rows, feature["_first"], feature["_words"], strict=True):
                if w is not None and is_first:
                    units[w] = row
        else:
            units = [None] * len(example[task.settings.text_column])
            for row, offset in zip(rows, feature["_offsets"], strict=True):
                if row is not None and offset is not None:
                    for c in range(offset[0], offset[1]):
                        units[c] = row
        scores.append(units)
    return scores


def answer_candidates(task, examples, features, outputs) -> list[list[dict[str, Any]]]:
    """Per question the n-best answers with probabilities (softmax of start + end logits over the distinct
    candidate spans and, when unanswerable questions are allowed, the null answer)."""
    scores = []
    for answer in task._answers(examples, features, outputs):
        best: dict[tuple[int, int], dict[str, Any]] = {}
        for c in answer["candidates"]:  # overlapping windows can find one span twice: keep its best score
            key = (c["start"], c["end"])
            if key not in best or c["score"] > best[key]["score"]:
                best[key] = c
        entries = [{"start": s, "end": e, "text": c["text"], "score": c["score"]} for (s, e), c in best.items()]
        if task.allow_impossible and math.isfinite(answer["null_score"]):
            entries.append({**NULL_ANSWER, "score": answer["null_score"]})
        if not entries:
            scores.append([])
            continue
        logits = torch.tensor([e["score"] for e in entries], dtype=torch.float64)
        probabilities = logits.softmax(0).tolist()
        ranked = sorted(zip(entries, probabilities, strict=True), key=lambda x: -x[1])
        scores.append([{k: e[k] for k in ("start", "end", "text")} | {"probability": p} for e, p in ranked])
    return scores


# ------------------------------------------------------------------------------------------------
# Decoding averaged scores


def unit_tags(units: list[Any], names: list[str]) -> list[str | None]:
    """Per unit the argmax tag, None for an unscored unit."""
    return [None if u is None else names[int(np.argmax(u))] for u in units]


def tags_to_entities(text: str, tags: list[str | None]) -> list[dict[str, Any]]:
    """Character tags -> entities ``{"start", "end", "type", "text"}``.

    Neighbouring characters with one tag form a piece (an untagged character, such as a space no token covers,
    ends a piece); the pieces are grouped with :func:`~bunmyaku.tasks.ner.group_tags`: a piece tagged ``B-X`` opens
    an entity, a piece tagged ``I-X`` continues an entity of type X and opens one otherwise; untagged characters
    between pieces do not end an entity. An entity runs from its first to its last tagged character.
    """
    pieces: list[tuple[int, int, str]] = []
    for c, tag in enumerate(tags):
        if tag is None:
            continue
        if pieces and pieces[-1][1] == c and pieces[-1][2] == tag:
            pieces[-1] = (pieces[-1][0], c + 1, tag)
        else:
            pieces.append((c, c + 1, tag))
    entities = []
    for first, last, kind in group_tags([tag for _, _, tag in pieces]):
        if kind != OUTSIDE:
            start, end = pieces[first][0], pieces[last - 1][1]
            entities.append({"start": start, "end": end, "type": kind, "text": text[start:end]})
    return entities


def entity_tags(length: int, entities: list[dict[str, Any]]) -> list[str]:
    """BIO tags per character of a text of ``length`` characters: ``B-type`` at an entity's first character,
    ``I-type`` on the rest of it, ``O`` elsewhere (what span metrics compare)."""
    tags = [OUTSIDE] * length
    for e in entities:
        tags[e["start"]] = f"B-{e['type']}"
        for c in range(e["start"] + 1, e["end"]):
            tags[c] = f"I-{e['type']}"
    return tags


def decode_answer(candidates: list[dict[str, Any]], null_threshold: float = 0.0) -> tuple[str, float]:
    """The answer text and its probability: the most probable candidate, "" when the null answer is that or
    when no span beats it by a factor exp(null_threshold) (finetune's null_threshold, on logits there)."""
    if not candidates:
        return "", 0.0
    spans = [c for c in candidates if c["start"] >= 0]
    null = next((c["probability"] for c in candidates if c["start"] < 0), None)
    if not spans:
        return "", float(null or 0.0)
    best = max(spans, key=lambda c: c["probability"])
    if null is not None and best["probability"] <= null * math.exp(null_threshold):
        return "", float(null)
    return best["text"], float(best["probability"])


def tag_predictions(scores: list[list[Any]], names: list[str], texts: list[str] | None = None) -> list[dict]:
    """Prediction fields from averaged ``tags`` scores: ``{"tags"}`` per word (CoNLL; "O" for an unscored word,
    as finetune writes it) or, given the ``texts`` (span data), ``{"entities"}`` from the character tags."""
    if texts is None:
        return [{"tags": [t or OUTSIDE for t in unit_tags(units, names)]} for units in scores]
    return [
        {"entities": tags_to_entities(text, unit_tags(units, names))} for text, units in zip(texts, scores, strict=True)
    ]


def tag_metrics(gold: list[Any], predicted: list[dict], scores: list[list[Any]], texts: list[str] | None = None):
    """finetune's token-classification keys (seqeval ``precision``, ``recall``, ``f1`` and tag ``accuracy``).

    CoNLL (``texts`` None): ``gold`` tags per word, compared on the words the model scored. Span data: ``gold``
    entities per text, compared as BIO tags over every character (:func:`entity_tags`), so an entity counts when
    its type, start and end all match.
    """
    from bunmyaku.tasks.metrics import accuracy, entity_f1

    gold_tags, predicted_tags = [], []
    if texts is None:
        for tags, record, units in zip(gold, predicted, scores, strict=True):
            scored = [w for w, u in enumerate(units) if u is not None]
            gold_tags.append([tags[w] for w in scored])
            predicted_tags.append([record["tags"][w] for w in scored])
    else:
        for entities, record, text in zip(gold, predicted, texts, strict=True):
            gold_tags.append(entity_tags(len(text), entities))
            predicted_tags.append(entity_tags(len(text), record["entities"]))
    flat_gold = [t for tags in gold_tags for t in tags]
    flat_predicted = [t for tags in predicted_tags for t in tags]
    return {**entity_f1(gold_tags, predicted_tags), "accuracy": accuracy(flat_gold, flat_predicted)}


def answer_predictions(scores: list[list[dict[str, Any]]], null_threshold: float = 0.0) -> list[dict[str, Any]]:
    """Prediction fields from averaged ``answers`` scores: ``{"prediction_text", "score"}`` (its probability)."""
    out = []
    for candidates in scores:
        text, probability = decode_answer(candidates, null_threshold)
        out.append({"prediction_text": text, "score": probability})
    return out


def answer_metrics(gold: list[list[str]], predicted: list[dict[str, Any]]) -> dict[str, float | None]:
    """SQuAD ``exact_match`` and ``f1`` of the predictions against each question's gold answer texts (none:
    unanswerable)."""
    from bunmyaku.data.tables import QAExample
    from bunmyaku.tasks.metrics import squad_metrics

    questions = [
        QAExample(str(i), "", "", [{"text": t, "answer_start": 0} for t in texts], not texts)
        for i, texts in enumerate(gold)
    ]
    return squad_metrics(predicted, questions)
