"""Text classification: labels and scores for texts (or text pairs) from a sequence-classification head.

How logits become scores follows the checkpoint's ``problem_type``: a softmax over the labels for
single-label classification, an independent sigmoid per label for multi-label classification, and the
raw value for regression. A head with one output and no ``problem_type`` is read as a binary sigmoid.

Long texts follow ``long_strategy`` as in fine-tuning (:mod:`bunmyaku.tasks.windows`): ``truncate`` (default),
``head-tail``, or ``windows``, whose windows' logits are pooled per text by ``window_pooling`` (``attention``
reads the ``window_pooling.safetensors`` a fine-tuning run saved beside the model). For a model that
``bunmyaku finetune`` wrote, the options not given default to the run's own (its ``finetune.json``: max_length,
long_strategy, stride, head_tokens, window_pooling), so the pipeline reads the model as ``bunmyaku predict`` does.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch

from bunmyaku.pipelines.base import Pipeline, check_at_least
from bunmyaku.pipelines.batching import label_names, length_sorted_batches, max_input_length, model_inputs
from bunmyaku.tasks import windows as long
from bunmyaku.tasks.base import collate_features, pad_id

ScoreFunction = Literal["softmax", "sigmoid", "none"]
# the long-input options, and their defaults for a model that no fine-tuning run wrote
LONG_DEFAULTS: dict[str, Any] = dict(long_strategy="truncate", stride=128, head_tokens=128, window_pooling="mean")


def score_function(config) -> ScoreFunction:
    """The function that turns this head's logits into scores, from ``problem_type`` and the label count."""
    if config.problem_type == "regression":
        return "none"
    if config.problem_type == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    return "softmax"


def apply_score_function(logits: torch.Tensor, function: ScoreFunction) -> torch.Tensor:
    """(B, L) logits -> (B, L) float32 scores."""
    logits = logits.float()
    if function == "softmax":
        return logits.softmax(-1)
    if function == "sigmoid":
        return logits.sigmoid()
    if function == "none":
        return logits
    raise ValueError(f"unknown score function {function!r}; use 'softmax', 'sigmoid' or 'none'")


Default = Literal["default"]


class TextClassificationPipeline(Pipeline):
    """Sentiment, topic, NLI, ...: the labels of a sequence-classification checkpoint, best first.

    The shape of what a call returns follows ``transformers``: without ``top_k`` (here or in the call), one
    ``{"label", "score"}`` (the best label) per text, ``[dict]`` for one string and ``[dict, ...]`` for a list;
    with ``top_k`` given in the call, a list of up to ``top_k`` dicts per text (``None``: every label); with
    ``top_k`` given here only, the same, and one string is wrapped in one more list, as transformers does.

    Args:
        model: a folder (or hub id) with a sequence-classification checkpoint and its tokenizer.
        device: where to run; default CUDA when available.
        top_k: labels returned per text, best first; None returns every label; unset: the best label alone.
        function_to_apply: "softmax", "sigmoid" or "none"; default from the checkpoint's ``problem_type``.
        batch_size: texts per forward pass (texts are sorted by length first).
        max_length: token limit per text (per window); default the fine-tuning run's, else the model's.
        long_strategy: ``truncate``, ``head-tail`` or ``windows`` for texts longer than ``max_length``; default the
            fine-tuning run's, else ``truncate``.
        stride: ``windows``: tokens shared by consecutive windows (default the run's, else 128).
        head_tokens: ``head-tail``: tokens kept from the start of the text (default the run's, else 128).
        window_pooling: ``windows``: ``mean``, ``max`` or ``attention`` over a text's window logits (default the
            run's, else ``mean``).
    """

    head = "sequence-classification"

    def __init__(
        self,
        model: str | os.PathLike,
        device: str | None = None,
        top_k: int | None | Default = "default",
        function_to_apply: ScoreFunction | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        long_strategy: long.Strategy | None = None,
        stride: int | None = None,
        head_tokens: int | None = None,
        window_pooling: long.Pooling | None = None,
    ):
        given = dict(long_strategy=long_strategy, stride=stride, head_tokens=head_tokens, window_pooling=window_pooling)
        long.check_options(*(default if given[k] is None else given[k] for k, default in LONG_DEFAULTS.items()))
        if top_k != "default":
            check_at_least("top_k", top_k)
        check_at_least("batch_size", batch_size)
        check_at_least("max_length", max_length)
        super().__init__(model, device)
        from bunmyaku.tasks.finetune import run_record

        run = (run_record(self.path) or {}).get("settings", {})  # a finetune run's model: read as predict reads it
        long_strategy, stride, head_tokens, window_pooling = (
            run.get(k, default) if given[k] is None else given[k] for k, default in LONG_DEFAULTS.items()
        )
        max_length = run.get("max_length") if max_length is None else max_length
        self.labels = label_names(self.model.config)
        self.top_k = top_k
        self.function_to_apply = function_to_apply or score_function(self.model.config)
        self.batch_size = batch_size
        self.max_length = max_input_length(self.tokenizer, self.model.config, max_length)
        long.check_options(long_strategy, stride, head_tokens, window_pooling, self.max_length)
        self.long_strategy, self.stride, self.head_tokens = long_strategy, stride, head_tokens
        self.window_pooling = window_pooling
        if long_strategy == "windows" and window_pooling == "attention":
            long.attach_pooler(self.model, self.path)

    @torch.inference_mode()
    def logits(
        self, texts: list[str], text_pairs: list[str] | None = None, truncation: str = "longest_first"
    ) -> torch.Tensor:
        """(N, L) float32 logits on the CPU for N texts (or pairs), in the input order."""
        if self.long_strategy != "truncate":
            return self._window_logits(texts, text_pairs)
        out = torch.empty(len(texts), len(self.labels))
        for rows in length_sorted_batches([len(t) for t in texts], self.batch_size):
            batch = self.tokenizer(
                [texts[i] for i in rows],
                None if text_pairs is None else [text_pairs[i] for i in rows],
                padding=True,
                truncation=truncation,
                max_length=self.max_length,
                return_tensors="pt",
            )
            out[rows] = self.model(**model_inputs(batch, self.device)).logits.float().cpu()
        return out

    def _window_logits(self, texts: list[str], text_pairs: list[str] | None) -> torch.Tensor:
        """(N, L) logits from the texts' head-tail inputs, or pooled from all their windows."""
        windows = long.cut(
            self.tokenizer,
            texts,
            text_pairs,
            max_length=self.max_length,
            strategy=self.long_strategy,
            stride=self.stride,
            head_tokens=self.head_tokens,
        )
        attention = self.long_strategy == "windows" and self.window_pooling == "attention"
        logits, weights = torch.empty(len(windows), len(self.labels)), torch.zeros(len(windows))
        pad = pad_id(self.tokenizer)
        for rows in length_sorted_batches([len(w["input_ids"]) for w in windows], self.batch_size):
            rows_in = [{"index": 0, **{k: windows[i][k] for k in long.INPUT_KEYS if k in windows[i]}} for i in rows]
            batch = collate_features(rows_in, pad)
            out = self.model(**model_inputs(batch, self.device), output_hidden_states=attention)
            logits[rows] = out.logits.float().cpu()
            if attention:
                weights[rows] = self.model.window_pooler(out.hidden_states[-1][:, 0]).float().cpu()
        if self.long_strategy == "head-tail":
            return logits
        owner = torch.tensor([w["example"] for w in windows])
        return long.pool(logits, owner, len(texts), self.window_pooling, weights if attention else None)

    def scores(
        self, texts: list[str], text_pairs: list[str] | None = None, function_to_apply: ScoreFunction | None = None
    ) -> torch.Tensor:
        """(N, L) float32 scores on the CPU for N texts (or pairs), in the input order."""
        return apply_score_function(self.logits(texts, text_pairs), function_to_apply or self.function_to_apply)

    def __call__(
        self,
        inputs: str | list[str] | dict[str, str] | list[dict[str, str]],
        text_pair: str | list[str] | None = None,
        top_k: int | None | Default = "default",
        function_to_apply: ScoreFunction | None = None,
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]] | dict[str, Any]:
        """Classify a text (or a list of texts), optionally as pairs with ``text_pair``.

        Args:
            inputs: a text or a list of texts; or, as in transformers, ``{"text": ..., "text_pair": ...}`` (or a
                list of those) for pairs.
            text_pair: the second text of each pair (NLI, paraphrase): a string for one text, a list for a list.
            top_k: labels per text, best first; None for all; default the pipeline's ``top_k``.
            function_to_apply: "softmax", "sigmoid" or "none" for this call; default the pipeline's.

        Returns:
            Shaped as transformers' pipeline returns it (see the class docstring): for one text ``[{"label",
            "score"}]`` (or ``[{...}, ...]`` with ``top_k``); for a list, one entry per text; for a
            ``{"text", "text_pair"}`` dict, that text's entry alone.
        """
        texts, pairs = _texts_and_pairs(inputs, text_pair)
        called_with_top_k = top_k != "default"
        k = top_k if called_with_top_k else self.top_k
        legacy = k == "default"  # transformers' unset top_k: the best label alone, unwrapped
        k = 1 if legacy else k
        check_at_least("top_k", k)
        k = len(self.labels) if k is None else min(k, len(self.labels))
        if not texts:
            return []
        best = self.scores(texts, pairs, function_to_apply).topk(k, dim=-1)
        results = [
            [{"label": self.labels[i], "score": v} for v, i in zip(values, indices, strict=True)]
            for values, indices in zip(best.values.tolist(), best.indices.tolist(), strict=True)
        ]
        results = [r[0] for r in results] if legacy else results
        if isinstance(inputs, dict):
            return results[0]
        if isinstance(inputs, str):
            return results[0] if called_with_top_k else [results[0]]
        return results


def _texts_and_pairs(
    inputs: str | list[str] | dict[str, str] | list[dict[str, str]], text_pair: str | list[str] | None
) -> tuple[list[str], list[str] | None]:
    """The texts and their pairs (None without pairs) from either calling convention."""
    items = [inputs] if isinstance(inputs, (str, dict)) else list(inputs)
    if any(isinstance(item, dict) for item in items):
        if text_pair is not None:
            raise ValueError("give pairs either as {'text', 'text_pair'} dicts or with text_pair=, not both")
        for index, item in enumerate(items):
            if not isinstance(item, dict) or "text" not in item:
                raise ValueError(f"input {index} must be a {{'text': ..., 'text_pair': ...}} dict, got {item!r:.80}")
        pairs = [item.get("text_pair") for item in items]
        if any(p is None for p in pairs) and any(p is not None for p in pairs):
            raise ValueError("either every input dict has a 'text_pair' or none has")
        return [item["text"] for item in items], None if pairs[0] is None else pairs
    pairs = None if text_pair is None else ([text_pair] if isinstance(text_pair, str) else list(text_pair))
    if pairs is not None and len(pairs) != len(items):
        raise ValueError(f"got {len(items)} texts but {len(pairs)} text pairs")
    return items, pairs
