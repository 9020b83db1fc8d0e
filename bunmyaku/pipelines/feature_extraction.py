"""Feature extraction: the encoder's last hidden states of each text, shaped as transformers returns them.

Each text gives its own (1, T, C) array: T tokens (special tokens included, no padding), C hidden units.
For sentence embeddings (pooled, normalised, compared by cosine) use ``sentence-similarity`` instead.
"""

from __future__ import annotations

import os

import torch

from bunmyaku.pipelines.base import Pipeline, check_at_least
from bunmyaku.pipelines.batching import length_sorted_batches, max_input_length, model_inputs


class FeatureExtractionPipeline(Pipeline):
    """Token embeddings (the base model's ``last_hidden_state``) for texts.

    Args:
        model: a folder (or hub id) with an encoder checkpoint (any head; only the base model runs).
        device: where to run; default CUDA when available.
        batch_size: texts per forward pass (texts are sorted by length first; padding does not change a text's
            features).
        max_length: token limit per text (longer texts are truncated); default the model's.
        dtype: model dtype ("float32" default).
    """

    head = "base"

    def __init__(
        self,
        model: str | os.PathLike,
        device: str | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        dtype: str | torch.dtype | None = None,
    ):
        check_at_least("batch_size", batch_size)
        check_at_least("max_length", max_length)
        super().__init__(model, device, dtype)
        self.batch_size = batch_size
        self.max_length = max_input_length(self.tokenizer, self.model.config, max_length)

    @torch.inference_mode()
    def features(self, texts: list[str]) -> list[torch.Tensor]:
        """One (T_i, C) float32 CPU tensor per text: the hidden state of each of its real tokens."""
        out: list[torch.Tensor | None] = [None] * len(texts)
        for rows in length_sorted_batches([len(t) for t in texts], self.batch_size):
            batch = self.tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            lengths = batch["attention_mask"].sum(1).tolist()
            hidden = self.model(**model_inputs(batch, self.device)).last_hidden_state.float().cpu()
            for row, states, length in zip(rows, hidden, lengths, strict=True):
                # padding is on the tokenizer's side; keep the real tokens only
                out[row] = states[:length] if self.tokenizer.padding_side == "right" else states[-length:]
        return out

    def __call__(
        self, inputs: str | list[str], return_tensors: bool = False
    ) -> list[list[list[float]]] | list[list[list[list[float]]]] | torch.Tensor | list[torch.Tensor]:
        """The features of a text (or of each text of a list).

        Args:
            inputs: a text or a list of texts.
            return_tensors: return (1, T, C) torch tensors instead of nested lists.

        Returns:
            For one text, nested lists of shape (1, T, C) (a tensor with ``return_tensors``); for a list, one
            such value per text. This is what transformers' ``feature-extraction`` pipeline returns.
        """
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"input {index} is {type(text).__name__}, expected a string")
        results = [f.unsqueeze(0) if return_tensors else [f.tolist()] for f in self.features(texts)]
        return results[0] if isinstance(inputs, str) else results
