"""A bi-encoder (Reimers & Gurevych 2019, Sentence-BERT): one encoder, pooled, applied to each side of a pair.

It saves as its encoder in HF layout plus the files sentence-transformers writes beside it (``modules.json``:
Transformer, Pooling, Normalize; ``1_Pooling/config.json``; ``sentence_bert_config.json``;
``config_sentence_transformers.json``), so ``sentence_transformers.SentenceTransformer(folder)`` loads it as
the same embedding model; training it is ``bunmyaku.tasks.embedding``'s.
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
MODULES = "modules.json"
SENTENCE_CONFIG = "sentence_bert_config.json"
ST_CONFIG = "config_sentence_transformers.json"
# sentence-transformers' modules, in order: the encoder (its files at the top of the folder), pooling (its config
# in 1_Pooling/), L2 normalisation (no files: sentence-transformers leaves its folder empty). embed() does all three.
SENTENCE_TRANSFORMERS_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


class BiEncoder(nn.Module):
    """An encoder and a pooling mode: ``forward`` embeds ``input_ids`` and, when given, ``pair_input_ids``.

    Args:
        encoder: a bunmyaku base model (``last_hidden_state``).
        pooling: "mean" or "cls".
        max_seq_length: the longest input in tokens that the model is meant for (sentence-transformers'
            ``max_seq_length``); default the encoder's position limit.
    """

    def __init__(self, encoder: nn.Module, pooling: str = "mean", max_seq_length: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.config = encoder.config
        self.max_seq_length = max_seq_length

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
        """The encoder in HF layout plus sentence-transformers' files, each written atomically."""
        from bunmyaku import __version__

        directory = Path(directory)
        self.encoder.save_pretrained(directory, dtype=dtype)
        pooling = {
            "word_embedding_dimension": self.config.hidden_size,
            "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        }
        max_length = self.max_seq_length or getattr(self.config, "max_seq_len", None)
        write_json_atomic(directory / POOLING_DIR / "config.json", pooling, sort_keys=False)
        write_json_atomic(directory / SENTENCE_CONFIG, {"max_seq_length": max_length, "do_lower_case": False})
        # the versions that wrote the folder; sentence-transformers only compares its own entry, absent here
        versions = {"bunmyaku": __version__, "pytorch": torch.__version__}
        write_json_atomic(directory / ST_CONFIG, {"__version__": versions}, sort_keys=False)
        write_json_atomic(directory / MODULES, SENTENCE_TRANSFORMERS_MODULES, sort_keys=False)
        return directory

    def load_hf_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load the encoder's HF tensors (checkpoint restore)."""
        self.encoder.load_hf_state_dict(state, source=source)

    @classmethod
    def from_pretrained(cls, path: str | Path, pooling: str | None = None, **kwargs: Any) -> BiEncoder:
        """Load an encoder folder; pooling from ``1_Pooling/config.json`` when present, else ``pooling`` or mean;
        the length limit from ``sentence_bert_config.json`` when present."""
        config_path = Path(path) / POOLING_DIR / "config.json"
        if pooling is None and config_path.is_file():
            pooling = "cls" if json.loads(config_path.read_text()).get("pooling_mode_cls_token") else "mean"
        sentence_config = Path(path) / SENTENCE_CONFIG
        max_length = None
        if sentence_config.is_file():
            max_length = json.loads(sentence_config.read_text(encoding="utf-8")).get("max_seq_length")
        return cls(from_pretrained(path, task="base", **kwargs), pooling or "mean", max_length)
