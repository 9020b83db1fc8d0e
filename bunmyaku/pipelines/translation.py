"""Translation with an encoder-decoder (MarianMT): greedy or beam search, batches sorted by length.

Decoding settings default to the folder's ``generation_config.json`` (Marian checkpoints ship
``num_beams``, ``max_length`` and the forbidden padding token there), then to greedy search.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from bunmyaku.pipelines.base import Pipeline, check_at_least
from bunmyaku.pipelines.batching import length_sorted_batches, max_input_length, model_inputs


def generation_settings(model_dir: Path) -> dict[str, Any]:
    """``num_beams``, ``max_new_tokens``, ``length_penalty`` and ``bad_token_ids`` from generation_config.json."""
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    settings: dict[str, Any] = {}
    if config.get("num_beams"):
        settings["num_beams"] = int(config["num_beams"])
    if config.get("max_new_tokens"):
        settings["max_new_tokens"] = int(config["max_new_tokens"])
    elif config.get("max_length"):
        settings["max_new_tokens"] = int(config["max_length"]) - 1  # max_length counts the start token
    if config.get("length_penalty") is not None:
        settings["length_penalty"] = float(config["length_penalty"])
    bad = config.get("bad_words_ids") or []
    if bad:
        settings["bad_token_ids"] = [ids[0] for ids in bad if len(ids) == 1]
    return settings


class TranslationPipeline(Pipeline):
    """Translate texts with a seq2seq checkpoint (MarianMT).

    Args:
        model: a folder (or hub id) with a seq2seq-lm checkpoint and its tokenizer.
        device: where to run; default CUDA when available.
        batch_size: texts per ``generate`` call (sorted by length first).
        max_length: source token limit (longer texts are truncated); default the model's.
        generate_kwargs: defaults for ``num_beams``, ``max_new_tokens``, ``length_penalty``, ``bad_token_ids``
            (over generation_config.json).
    """

    head = "seq2seq-lm"

    def __init__(
        self,
        model: str | os.PathLike,
        device: str | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        **generate_kwargs: Any,
    ):
        check_at_least("batch_size", batch_size)
        check_at_least("max_length", max_length)
        super().__init__(model, device)  # Marian folders: source.spm + vocab.json
        self.settings = {"num_beams": 1, "max_new_tokens": 256, **generation_settings(self.path), **generate_kwargs}
        _check_settings(self.settings)
        self.batch_size = batch_size
        self.max_length = max_input_length(self.tokenizer, self.model.config, max_length)

    @torch.inference_mode()
    def __call__(self, inputs: str | list[str], **generate_kwargs: Any) -> list[dict[str, str]]:
        """Translate a text or a list of texts.

        Args:
            inputs: a text or a list of texts.
            generate_kwargs: ``num_beams``, ``max_new_tokens``, ``length_penalty``, ``bad_token_ids`` for this
                call (see ``TransformerForSeq2SeqLM.generate``).

        Returns:
            ``[{"translation_text": ...}]``, one dict per input text, in the input order.
        """
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        settings = {**self.settings, **generate_kwargs}
        _check_settings(settings)
        outputs: list[str] = [""] * len(texts)
        for rows in length_sorted_batches([len(t) for t in texts], self.batch_size):
            batch = self.tokenizer(
                [texts[i] for i in rows], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            source = model_inputs(batch, self.device)
            tokens = self.model.generate(source["input_ids"], source["attention_mask"], **settings)
            decoded = self.tokenizer.batch_decode(tokens[:, 1:].tolist(), skip_special_tokens=True)
            for row, text in zip(rows, decoded, strict=True):
                outputs[row] = text
        return [{"translation_text": text} for text in outputs]


def _check_settings(settings: dict[str, Any]) -> None:
    check_at_least("num_beams", settings.get("num_beams"))
    check_at_least("max_new_tokens", settings.get("max_new_tokens"), 0)
