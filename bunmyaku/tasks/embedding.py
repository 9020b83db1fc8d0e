"""Sentence embeddings: a bi-encoder (one encoder, pooled, applied to each side of a pair).

Two losses:

- ``contrastive`` (MultipleNegativesRanking, Henderson et al. 2017): (anchor, positive) pairs; within a batch
  every other positive is a negative; cross-entropy over ``scale * cos(a_i, b_j)`` with the diagonal as target.
- ``cosine``: scored pairs; mean squared error between ``cos(a, b)`` and ``label / label_max``.

Metrics on the held-out pairs: ``pearson`` / ``spearman`` of the cosine against the gold score when the data
has scores, and in-batch retrieval ``accuracy`` (is the paired sentence the nearest one in its batch).
The model saves as its encoder (HF layout) plus ``1_Pooling/config.json`` as sentence-transformers writes it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bunmyaku.data.tables import finite_number, where
from bunmyaku.models.bi_encoder import BiEncoder
from bunmyaku.tasks.base import Feature, Task
from bunmyaku.tasks.metrics import pearson, spearman

__all__ = ["BiEncoder", "SentenceEmbedding"]  # the model lives in models/; the fine-tuning driver imports it here


class SentenceEmbedding(Task):
    """Bi-encoder training on sentence pairs (``text_column``, ``text_pair_column``, optional scores)."""

    name = "sentence-embedding"
    head = "base"

    @property
    def metric(self) -> str:  # type: ignore[override]
        return "spearman" if self.settings.label_column else "accuracy"

    def columns(self, labelled: bool) -> list[str]:
        s = self.settings
        if not s.text_pair_column:
            raise ValueError("a bi-encoder trains on pairs: give --text-pair-column")
        needs_label = labelled and (s.loss == "cosine")
        return [s.text_column, s.text_pair_column] + ([s.label_column] if needs_label else [])

    def num_labels(self) -> int | None:
        return None

    def check_labels(self, examples: list[dict[str, Any]], source: str) -> None:
        column = self.settings.label_column
        for example in examples:
            if column and example.get(column) is not None:
                finite_number(example[column], where(example, source), "score")

    def encode(self, tokenizer, examples, labelled=True, source=""):
        s = self.settings
        kw = {"truncation": True, "max_length": s.max_length, "return_tensors": None}
        a = tokenizer([str(e[s.text_column]) for e in examples], **kw)
        b = tokenizer([str(e[s.text_pair_column]) for e in examples], **kw)
        features = []
        for i, example in enumerate(examples):
            feature: Feature = {
                "input_ids": a["input_ids"][i],
                "attention_mask": a["attention_mask"][i],
                "pair_input_ids": b["input_ids"][i],
                "pair_attention_mask": b["attention_mask"][i],
                "example": i,
            }
            if s.label_column and example.get(s.label_column) is not None:
                feature["labels"] = finite_number(example[s.label_column], where(example, source), "score")
            features.append(feature)
        return features

    def forward(self, model, batch):
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pair_input_ids=batch["pair_input_ids"],
            pair_attention_mask=batch["pair_attention_mask"],
        )
        cosines = out.logits  # (B, B)
        s = self.settings
        if s.loss == "cosine":
            loss = F.mse_loss(cosines.diagonal(), batch["labels"].float() / s.label_max) if "labels" in batch else None
        else:
            targets = torch.arange(len(cosines), device=cosines.device)
            loss = F.cross_entropy(cosines * s.scale, targets)
        nearest = (cosines.argmax(-1) == torch.arange(len(cosines), device=cosines.device)).float()
        return loss, torch.stack([cosines.diagonal(), nearest], dim=-1).detach()  # (B, 2)

    def metrics(self, examples, features, outputs):
        cosines = [float(o[0]) for o in outputs]
        out = {"accuracy": sum(float(o[1]) for o in outputs) / len(outputs)}
        if all("labels" in f for f in features):
            gold = [f["labels"] for f in features]
            out.update(pearson=pearson(gold, cosines), spearman=spearman(gold, cosines))
        return out

    def predictions(self, examples, features, outputs):
        s = self.settings
        return [
            {"text": e[s.text_column], "text_pair": e[s.text_pair_column], "cosine": round(float(o[0]), 6)}
            for e, o in zip(examples, outputs, strict=True)
        ]
