"""Fill-mask: the masked-LM head's guesses for each mask token, with their probabilities."""

from __future__ import annotations

import os
from typing import Any

import torch

from bunmyaku.hub import resolve_model_dir
from bunmyaku.models import from_pretrained
from bunmyaku.pipelines import default_device
from bunmyaku.tokenization import Tokenizer


class FillMaskPipeline:
    """Top-k predictions for the mask token(s) in a text.

    Args:
        model: a folder (or hub id) with a masked-LM checkpoint and its tokenizer.
        device: where to run; default CUDA when available.
        top_k: number of predictions per mask.
    """

    def __init__(self, model: str | os.PathLike, device: str | None = None, top_k: int = 5):
        model_dir = resolve_model_dir(model)
        self.device = default_device(device)
        self.tokenizer = Tokenizer.from_pretrained(model_dir)
        if self.tokenizer.mask_token_id is None:
            raise ValueError(f"the tokenizer in {model_dir} has no mask token; fill-mask needs one")
        self.model = from_pretrained(model_dir, task="masked-lm", device=self.device)
        self.top_k = top_k

    @torch.inference_mode()
    def _predict(self, text: str, top_k: int) -> list[list[dict[str, Any]]]:
        batch = self.tokenizer(text).to(self.device)
        ids = batch["input_ids"][0]
        positions = (ids == self.tokenizer.mask_token_id).nonzero().flatten()
        if len(positions) == 0:
            raise ValueError(f"no {self.tokenizer.mask_token} token in {text!r}")
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        probs = self.model(**inputs).logits[0, positions].float().softmax(-1)  # (M, V)
        best = probs.topk(top_k, dim=-1)
        results = []
        for slot, (scores, tokens) in enumerate(zip(best.values.tolist(), best.indices.tolist(), strict=True)):
            candidates = []
            for score, token in zip(scores, tokens, strict=True):
                filled = ids.clone()
                filled[positions[slot]] = token
                candidates.append(
                    {
                        "score": score,
                        "token": token,
                        "token_str": self.tokenizer.decode([token]).strip(),
                        "sequence": self.tokenizer.decode(filled.tolist(), skip_special_tokens=True),
                    }
                )
            results.append(candidates)
        return results

    def __call__(self, text: str | list[str], top_k: int | None = None) -> list:
        """Predictions for a text (or each of a list).

        Returns:
            For one mask, a list of ``{"score", "token", "token_str", "sequence"}``, best first; for several
            masks, one such list per mask; for a list of texts, one result per text.
        """
        top_k = top_k or self.top_k
        texts = [text] if isinstance(text, str) else list(text)
        out = []
        for t in texts:
            per_mask = self._predict(t, top_k)
            out.append(per_mask[0] if len(per_mask) == 1 else per_mask)
        return out[0] if isinstance(text, str) else out
