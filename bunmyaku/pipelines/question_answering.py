"""Extractive question answering: the span of the context that answers a question, with its probability.

A long context is cut into overlapping windows (:func:`bunmyaku.tasks.qa.prepare_features`). In each
window the start and end logits are turned into probabilities over the context tokens and the [CLS]
token; a span's score is p(start) * p(end), for spans inside the context, end not before start, at most
``max_answer_len`` tokens. [CLS]'s own p(start) * p(end) is the "no answer" score: with
``handle_impossible_answer`` the empty answer competes with the spans at the lowest such score over the
windows. Answers carry character offsets into the context.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from bunmyaku.data.tables import QAExample
from bunmyaku.pipelines.base import Pipeline, check_at_least
from bunmyaku.pipelines.batching import length_sorted_batches, max_input_length, model_inputs
from bunmyaku.tasks.qa import QAFeatures, prepare_features


class QuestionAnsweringPipeline(Pipeline):
    """Answer questions from a context with a question-answering (start / end logits) checkpoint.

    Args:
        model: a folder (or hub id) with a question-answering checkpoint and its tokenizer.
        device: where to run; default CUDA when available.
        max_length: tokens per window, question and special tokens included (default 384, or less).
        stride: tokens shared by neighbouring windows.
        max_answer_len: the longest answer, in tokens.
        handle_impossible_answer: allow the empty answer (SQuAD 2.0 models).
        batch_size: windows per forward pass (sorted by length first).
        long_strategy: ``windows``, the only strategy for QA (accepted for the same options as the other
            pipelines): every window of the context is searched.
    """

    head = "question-answering"

    def __init__(
        self,
        model: str | os.PathLike,
        device: str | None = None,
        max_length: int = 384,
        stride: int = 128,
        max_answer_len: int = 15,
        handle_impossible_answer: bool = False,
        batch_size: int = 16,
        long_strategy: str = "windows",
    ):
        if long_strategy != "windows":
            raise ValueError(f"question answering always windows long contexts; long_strategy {long_strategy!r}")
        check_at_least("max_length", max_length)
        check_at_least("stride", stride, 0)
        check_at_least("max_answer_len", max_answer_len)
        check_at_least("batch_size", batch_size)
        super().__init__(model, device)
        self.max_length = min(max_length, max_input_length(self.tokenizer, self.model.config))
        self.stride = stride
        self.max_answer_len = max_answer_len
        self.handle_impossible_answer = handle_impossible_answer
        self.batch_size = batch_size

    @torch.inference_mode()
    def _logits(self, features: QAFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, T) start and end logits for every window, on the CPU, in float32."""
        inputs = features.inputs
        starts = torch.zeros(inputs["input_ids"].shape)
        ends = torch.zeros(inputs["input_ids"].shape)
        for rows in length_sorted_batches(inputs["attention_mask"].sum(1).tolist(), self.batch_size):
            batch = model_inputs(inputs, self.device, rows)
            out = self.model(**batch)
            T = batch["input_ids"].size(1)
            starts[rows, :T] = out.start_logits.float().cpu()
            ends[rows, :T] = out.end_logits.float().cpu()
        return starts, ends

    def __call__(
        self,
        question: str | list[str],
        context: str | list[str],
        top_k: int = 1,
        max_answer_len: int | None = None,
        handle_impossible_answer: bool | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]] | list:
        """Answer one question (or a list of questions, each with its own context, or all with one context).

        Args:
            question: a question or a list of them.
            context: the text to answer from: one for all questions, or one per question.
            top_k: answers per question, best first.
            max_answer_len: override the pipeline's longest answer (tokens).
            handle_impossible_answer: override the pipeline's setting.

        Returns:
            Per question ``{"answer", "score", "start", "end"}`` (``context[start:end] == answer``), or with
            ``top_k > 1`` a list of them; for a list of questions, one result per question.
        """
        single = isinstance(question, str)
        questions = [question] if single else list(question)
        contexts = [context] * len(questions) if isinstance(context, str) else list(context)
        if len(contexts) != len(questions):
            raise ValueError(f"got {len(questions)} questions but {len(contexts)} contexts")
        check_at_least("top_k", top_k)
        check_at_least("max_answer_len", max_answer_len)
        max_answer_len = max_answer_len or self.max_answer_len
        impossible = self.handle_impossible_answer if handle_impossible_answer is None else handle_impossible_answer
        examples = [QAExample(str(i), q, c) for i, (q, c) in enumerate(zip(questions, contexts, strict=True))]
        if not examples:
            return []
        features = prepare_features(self.tokenizer, examples, max_length=self.max_length, stride=self.stride)
        start_logits, end_logits = self._logits(features)
        per_example: list[list[dict[str, Any]]] = [[] for _ in examples]
        null_scores = [float("inf")] * len(examples)
        for w, idx in enumerate(features.example_index):
            answers, null = self._window_answers(
                examples[idx].context,
                features.inputs["input_ids"][w],
                features.offsets[w],
                start_logits[w],
                end_logits[w],
                top_k,
                max_answer_len,
            )
            per_example[idx] += answers
            null_scores[idx] = min(null_scores[idx], null)
        results = []
        for answers, null in zip(per_example, null_scores, strict=True):
            if impossible and null != float("inf"):
                answers.append({"answer": "", "score": null, "start": 0, "end": 0})
            answers = sorted(answers, key=lambda a: -a["score"])[:top_k]
            if not answers:
                answers = [{"answer": "", "score": 0.0, "start": 0, "end": 0}]
            results.append(answers[0] if top_k == 1 else answers)
        return results[0] if single else results

    def _window_answers(
        self,
        context: str,
        input_ids: torch.Tensor,
        offsets: list[tuple[int, int] | None],
        start_logits: torch.Tensor,
        end_logits: torch.Tensor,
        top_k: int,
        max_answer_len: int,
    ) -> tuple[list[dict[str, Any]], float]:
        """The ``top_k`` best spans of one window, and the window's no-answer score."""
        in_context = torch.tensor([o is not None for o in offsets])
        cls = input_ids == self.tokenizer.cls_token_id if self.tokenizer.cls_token_id is not None else None
        allowed = in_context | cls if cls is not None else in_context
        # probabilities over the context tokens and [CLS]; questions, separators and padding are ruled out
        p_start = start_logits.masked_fill(~allowed, -torch.inf).softmax(-1)
        p_end = end_logits.masked_fill(~allowed, -torch.inf).softmax(-1)
        null = float("inf")
        if cls is not None and cls.any():
            first = int(cls.nonzero()[0])
            null = float(p_start[first] * p_end[first])
        p_start, p_end = p_start * in_context, p_end * in_context
        T = len(offsets)
        spans = p_start[:, None] * p_end[None, :]  # (T, T): start row, end column
        span_len = torch.arange(T)[None, :] - torch.arange(T)[:, None] + 1
        spans = spans.masked_fill((span_len < 1) | (span_len > max_answer_len), 0.0)
        best = spans.flatten().topk(min(top_k, spans.numel()))
        answers = []
        for score, flat in zip(best.values.tolist(), best.indices.tolist(), strict=True):
            s, e = divmod(flat, T)
            if score <= 0.0 or offsets[s] is None or offsets[e] is None:
                continue
            start, end = offsets[s][0], offsets[e][1]
            answers.append({"answer": context[start:end], "score": score, "start": start, "end": end})
        return answers, null
