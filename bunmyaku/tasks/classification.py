"""Text and sentence-pair classification: single-label, multi-label and regression (a cross-encoder for STS).

One text (``text_column``) or a pair (``text_pair_column``, encoded ``[CLS] a [SEP] b [SEP]`` with segment ids
0 / 1) goes through the model's sequence-classification head. ``problem_type``:

- ``single-label``: one class per example; metrics ``accuracy`` and macro ``f1``;
- ``multi-label``: any number of classes per example (a list in JSON, or names joined by
  ``label_separator`` in a table); sigmoid > 0.5 per class; ``accuracy`` is exact-set accuracy, ``f1`` macro;
- ``regression``: one number; ``pearson``, ``spearman`` and ``mse``.

Long texts follow ``long_strategy`` (:mod:`bunmyaku.tasks.windows`): ``truncate``, ``head-tail``, or ``windows``,
where a feature is a whole document holding all its windows (a pair keeps its first text in each window), a
batch runs every window of its documents, the windows' logits are pooled per document (``window_pooling``) and
the loss, metrics and predictions are per document.
"""

from __future__ import annotations

from typing import Any

import torch

from bunmyaku.data.tables import LabelMap, finite_number, where
from bunmyaku.tasks import windows as long
from bunmyaku.tasks.base import Feature, Task, model_inputs
from bunmyaku.tasks.metrics import accuracy, macro_f1, mean_squared_error, multi_label_f1, pearson, spearman

PROBLEM_TYPES = {
    "single-label": "single_label_classification",
    "multi-label": "multi_label_classification",
    "regression": "regression",
}


class TextClassification(Task):
    """Sequence classification of texts or text pairs."""

    name = "text-classification"
    head = "sequence-classification"

    @property
    def problem(self) -> str:
        return self.settings.problem_type or "single-label"

    @property
    def metric(self) -> str:  # type: ignore[override]
        return "spearman" if self.problem == "regression" else "accuracy"

    def columns(self, labelled: bool) -> list[str]:
        s = self.settings
        cols = [s.text_column] + ([s.text_pair_column] if s.text_pair_column else [])
        return cols + ([s.label_column] if labelled else [])

    def _label_names(self, example: dict[str, Any]) -> list[str]:
        value = example[self.settings.label_column]
        if isinstance(value, list):
            return [str(v) for v in value]
        return [v.strip() for v in str(value).split(self.settings.label_separator) if v.strip()]

    def check_labels(self, examples: list[dict[str, Any]], source: str) -> None:
        if self.problem == "regression":
            for example in examples:
                finite_number(example[self.settings.label_column], where(example, source))

    def fit_labels(self, examples: list[dict[str, Any]]) -> None:
        if self.problem == "regression":
            self.labels = ["score"]
        elif self.problem == "multi-label":
            self.labels = LabelMap.fit(n for e in examples for n in self._label_names(e)).names
        else:
            self.labels = LabelMap.fit(e[self.settings.label_column] for e in examples).names

    def problem_type(self) -> str:
        """The HF ``problem_type`` stored in config.json."""
        return PROBLEM_TYPES[self.problem]

    def _target(self, example: dict[str, Any], source: str) -> Any:
        label_map = LabelMap(self.labels or [])
        value = example[self.settings.label_column]
        if self.problem == "regression":
            return finite_number(value, where(example, source))
        if self.problem == "multi-label":
            hot = [0.0] * len(label_map)
            for name in self._label_names(example):
                hot[label_map.encode(name, where(example, source))] = 1.0
            return hot
        return label_map.encode(value, where(example, source))

    def encode(
        self, tokenizer: Any, examples: list[dict[str, Any]], labelled: bool = True, source: str = ""
    ) -> list[Feature]:
        s = self.settings
        texts = [str(e[s.text_column]) for e in examples]
        pairs = [str(e[s.text_pair_column]) for e in examples] if s.text_pair_column else None
        features = []
        for i, feature in enumerate(self._inputs(tokenizer, texts, pairs)):
            feature["example"] = i
            example = examples[i]
            if labelled:
                feature["labels"] = self._target(example, source)
            features.append(feature)
        return features

    def _inputs(self, tokenizer: Any, texts: list[str], pairs: list[str] | None) -> list[Feature]:
        """Per document its model inputs: one row (truncate, head-tail), or with windows a list of rows per key."""
        s = self.settings
        strategy = getattr(s, "long_strategy", "truncate")
        keys = long.INPUT_KEYS
        if strategy == "truncate":
            enc = tokenizer(texts, pairs, truncation=True, max_length=s.max_length, return_tensors=None)
            return [{k: enc[k][i] for k in keys if k in enc} for i in range(len(texts))]
        cut = long.cut(
            tokenizer,
            texts,
            pairs,
            max_length=s.max_length,
            strategy=strategy,
            stride=s.stride,
            head_tokens=s.head_tokens,
        )
        if strategy == "head-tail":
            return [{k: w[k] for k in keys if k in w} for w in cut]
        docs: list[Feature] = [{k: [] for k in keys if k in cut[0]} for _ in texts]
        for window in cut:
            for k, rows in docs[window["example"]].items():
                rows.append(window[k])
        return docs

    @property
    def windowed(self) -> bool:
        return getattr(self.settings, "long_strategy", "truncate") == "windows"

    def prepare_model(self, model, tokenizer):
        model = super().prepare_model(model, tokenizer)
        if self.windowed and self.settings.window_pooling == "attention":
            long.attach_pooler(model)
        return model

    def collate(self, features, pad):
        return long.collate_windows(features, pad) if self.windowed else super().collate(features, pad)

    def forward(self, model, batch):
        if "labels" in batch and self.problem == "regression":
            batch = {**batch, "labels": batch["labels"].float()}
        if "window_doc" not in batch:
            return super().forward(model, batch)
        inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
        pooling = self.settings.window_pooling
        logits = long.window_logits(model, inputs, batch["window_doc"], len(batch["index"]), pooling)
        return (self._loss(logits, batch["labels"]) if "labels" in batch else None), logits.detach()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean loss over documents, as the sequence-classification heads compute it over rows."""
        logits = logits.float()
        if self.problem == "regression":
            return torch.nn.functional.mse_loss(logits[:, 0], labels.float())
        if self.problem == "multi-label":
            return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
        return torch.nn.functional.cross_entropy(logits, labels)

    # ------------------------------------------------------------------------------ results

    def _decoded(self, outputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[Any]]:
        logits = torch.stack([o.float() for o in outputs])
        if self.problem == "regression":
            return logits[:, 0], logits[:, 0].tolist()
        if self.problem == "multi-label":
            probs = logits.sigmoid()
            return probs, [[i for i, p in enumerate(row) if p > 0.5] for row in probs.tolist()]
        probs = logits.softmax(-1)
        return probs, probs.argmax(-1).tolist()

    def metrics(self, examples, features, outputs):
        _, predicted = self._decoded(outputs)
        gold = [f["labels"] for f in features]
        if self.problem == "regression":
            return {
                "pearson": pearson(gold, predicted),
                "spearman": spearman(gold, predicted),
                "mse": mean_squared_error(gold, predicted),
            }
        num = len(self.labels or [])
        if self.problem == "multi-label":
            gold_sets = [[i for i, v in enumerate(g) if v > 0.5] for g in gold]
            return {"accuracy": accuracy(gold_sets, predicted), "f1": multi_label_f1(gold_sets, predicted, num)}
        return {"accuracy": accuracy(gold, predicted), "f1": macro_f1(gold, predicted, num)}

    def predictions(self, examples, features, outputs):
        scores, predicted = self._decoded(outputs)
        names = self.labels or []
        records = []
        for example, score_row, pred in zip(examples, scores, predicted, strict=True):
            record: dict[str, Any] = {"text": example[self.settings.text_column]}
            if self.settings.text_pair_column:
                record["text_pair"] = example[self.settings.text_pair_column]
            if self.problem == "regression":
                record["score"] = pred
            elif self.problem == "multi-label":
                record["labels"] = [names[i] for i in pred]
                record["scores"] = {n: round(float(p), 6) for n, p in zip(names, score_row.tolist(), strict=True)}
            else:
                record["label"] = names[pred]
                record["score"] = float(score_row[pred])
            if self.settings.label_column in example:
                record["gold"] = example[self.settings.label_column]
            records.append(record)
        return records


class SentenceSimilarityCross(TextClassification):
    """A cross-encoder for sentence pairs: both sentences in one input, a regression (or class) head."""

    name = "sentence-similarity"

    @property
    def problem(self) -> str:
        return self.settings.problem_type or "regression"
