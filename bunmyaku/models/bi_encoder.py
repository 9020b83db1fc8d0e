"""A bi-encoder (Reimers & Gurevych 2019, Sentence-BERT): one encoder, pooled, applied to each side of a pair.

It saves as its encoder in HF layout plus ``1_Pooling/config.json`` as sentence-transformers writes it, so
``sentence_transformers.SentenceTransformer(folder)`` loads it; training it is ``bunmyaku.tasks.embedding``'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bunmyaku.hub import write_json_atomic
from bunmyaku.models.auto import from_pretrained
from bunmyaku.models.base import ModelOutput
from bunmyaku.models.pooling import pool

POOLING_DIR = "1_Pooling"


class BiEncoder(nn.Module):
    """An encoder and a pooling mode: ``forward`` embeds ``input_ids`` and, when given, ``pair_input_ids``.

    Args:
        encoder: a bunmyaku base model (``last_hidden_state``).
        pooling: "mean" or "cls".
    """

    def __init__(self, encoder: nn.Module, pooling: str = "mean"):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.config = encoder.config

    def embed(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """(B, T) ids -> (B, C) L2-normalised sentence vectors."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.pooling, normalize=True)

    def forward(
        self, input_ids, attention_mask, pair_input_ids=None, pair_attention_mask=None, token_type_ids=None, **_
    ) -> ModelOutput:
        """Embeddings of the first side in ``pooler_output`` (B, C); with a second side, ``logits`` (B, B) holds
        the cosine of every first-side sentence with every second-side one."""
        a = self.embed(input_ids, attention_mask)
        if pair_input_ids is None:
            return ModelOutput(pooler_output=a)
        b = self.embed(pair_input_ids, pair_attention_mask)
        return ModelOutput(pooler_output=a, logits=a @ b.T)

    def save_pretrained(self, directory: str | Path, dtype: str | None = None) -> Path:
        """The encoder in HF layout plus the pooling config sentence-transformers reads."""
        directory = Path(directory)
        self.encoder.save_pretrained(directory, dtype=dtype)
        (directory / POOLING_DIR).mkdir(exist_ok=True)
        pooling = {
            "word_embedding_dimension": self.config.hidden_size,
            "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean",
        }
        write_json_atomic(directory / POOLING_DIR / "config.json", pooling)
        return directory

    def load_hf_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load the encoder's HF tensors (checkpoint restore)."""
        self.encoder.load_hf_state_dict(state, source=source)

    @classmethod
    def from_pretrained(cls, path: str | Path, pooling: str | None = None, **kwargs: Any) -> BiEncoder:
        """Load an encoder folder; pooling from ``1_Pooling/config.json`` when present, else ``pooling`` or mean."""
        config_path = Path(path) / POOLING_DIR / "config.json"
        if pooling is None and config_path.is_file():
            pooling = "cls" if json.loads(config_path.read_text()).get("pooling_mode_cls_token") else "mean"
        return cls(from_pretrained(path, task="base", **kwargs), pooling or "mean")
