"""Sentence similarity: embed sentences with a bi-encoder, compare by cosine, search a corpus.

Works with sentence-transformers folders (all-MiniLM-L6-v2): the pooling mode comes from
``1_Pooling/config.json``, L2 normalisation from ``modules.json``, the length limit from
``sentence_bert_config.json``. All sentences are tokenized in one batched call (the Rust tokenizer
runs them in parallel), then sorted by token count and cut into batches, so each batch pads to
similar lengths and little compute is spent on padding.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from bunmyaku.models.pooling import pool
from bunmyaku.pipelines.base import Pipeline, check_at_least
from bunmyaku.pipelines.batching import length_sorted_batches

logger = logging.getLogger(__name__)


def _read_json(path: Path) -> dict[str, Any] | list[Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def sentence_transformers_settings(model_dir: Path) -> dict[str, Any]:
    """Pooling mode, normalisation and maximum length from a sentence-transformers folder (defaults otherwise)."""
    pooling = _read_json(model_dir / "1_Pooling" / "config.json") or {}
    modules = _read_json(model_dir / "modules.json") or []
    bert_config = _read_json(model_dir / "sentence_bert_config.json") or {}
    mode = "cls" if pooling.get("pooling_mode_cls_token") else "mean"
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    return {"pooling": mode, "normalize": normalize, "max_length": bert_config.get("max_seq_length", 512)}


class SentenceSimilarityPipeline(Pipeline):
    """Embeddings, cosine similarities and semantic search with a bi-encoder.

    Args:
        model: a sentence-transformers or plain BERT-family folder (or hub repo id).
        device: where to run; default CUDA when available.
        batch_size: sentences per forward pass.
        pooling: "mean" or "cls"; default from the folder.
        max_length: token limit; default from the folder.
        dtype: model dtype ("float32" default; "bfloat16" on GPU is faster).
    """

    head = "base"

    def __init__(
        self,
        model: str | os.PathLike,
        device: str | None = None,
        batch_size: int = 64,
        pooling: str | None = None,
        max_length: int | None = None,
        dtype: str | torch.dtype | None = None,
    ):
        check_at_least("batch_size", batch_size)
        check_at_least("max_length", max_length)
        super().__init__(model, device, dtype)
        settings = sentence_transformers_settings(self.path)
        self.batch_size = batch_size
        self.pooling = pooling or settings["pooling"]
        self.normalize = settings["normalize"]
        self.max_length = max_length or settings["max_length"]

    @torch.inference_mode()
    def encode(self, sentences: list[str], normalize: bool | None = None) -> torch.Tensor:
        """Embed sentences: list of N strings -> (N, C) float tensor on the CPU, in the input order.

        Args:
            sentences: the texts.
            normalize: L2-normalise; default: as the model folder says (MiniLM: yes).
        """
        normalize = self.normalize if normalize is None else normalize
        if isinstance(sentences, str):
            sentences = [sentences]
        ids = self.tokenizer(sentences, truncation=True, max_length=self.max_length, return_tensors=None)["input_ids"]
        out = torch.empty(len(ids), self.model.config.hidden_size)
        for rows in length_sorted_batches([len(row) for row in ids], self.batch_size):
            batch = self._pad([ids[i] for i in rows])
            hidden = self.model(**batch).last_hidden_state
            out[rows] = pool(hidden, batch["attention_mask"], self.pooling, normalize).float().cpu()
        return out

    def _pad(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Token ids of one batch, longest first -> right-padded (B, T) ``input_ids`` and ``attention_mask``."""
        T = len(ids[0])
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([row + [pad] * (T - len(row)) for row in ids])
        mask = torch.tensor([[1] * len(row) + [0] * (T - len(row)) for row in ids])
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}

    def similarity(self, sentences: list[str], others: list[str] | None = None) -> list[list[float]]:
        """Cosine similarity of every sentence with every other (or with every one of ``others``)."""
        a = self.encode(sentences, normalize=True)
        b = a if others is None else self.encode(others, normalize=True)
        return (a @ b.T).tolist()

    def search(self, queries: list[str], corpus: list[str], top_k: int = 5) -> list[list[dict[str, Any]]]:
        """Semantic search: for each query, the ``top_k`` most similar corpus entries, best first.

        Returns:
            Per query, a list of ``{"corpus_id", "text", "score"}``.
        """
        check_at_least("top_k", top_k)
        if isinstance(queries, str):
            queries = [queries]
        scores = self.encode(queries, normalize=True) @ self.encode(corpus, normalize=True).T  # (Q, N)
        best = scores.topk(min(top_k, len(corpus)), dim=-1)
        return [
            [{"corpus_id": int(i), "text": corpus[int(i)], "score": float(s)} for s, i in zip(vals, idx, strict=True)]
            for vals, idx in zip(best.values, best.indices, strict=True)
        ]

    def __call__(self, sentences: list[str], others: list[str] | None = None) -> list[list[float]]:
        """The cosine similarity matrix, as lists."""
        return self.similarity(sentences, others)
