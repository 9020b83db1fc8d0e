"""Fill-mask: the masked-LM head's guesses for each mask token, with their probabilities.

A text longer than the model's limit is cut to the window of tokens centred on its mask(s), with a
warning; the predictions and the returned ``sequence`` then cover that window.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from bunmyaku.pipelines.base import Pipeline, check_at_least
from bunmyaku.pipelines.batching import max_input_length

logger = logging.getLogger(__name__)


class FillMaskPipeline(Pipeline):
    """Top-k predictions for the mask token(s) in a text.

    Args:
        model: a folder (or hub id) with a masked-LM checkpoint and its tokenizer.
        device: where to run; default CUDA when available.
        top_k: number of predictions per mask.
    """

    head = "masked-lm"

    def __init__(self, model: str | os.PathLike, device: str | None = None, top_k: int = 5):
        check_at_least("top_k", top_k)
        super().__init__(model, device)
        if self.tokenizer.mask_token_id is None:
            raise ValueError(f"the tokenizer in {self.path} has no mask token; fill-mask needs one")
        self.top_k = top_k
        self.max_length = max_input_length(self.tokenizer, self.model.config)

    def _window(self, text: str) -> list[int]:
        """The token ids of ``text``, cut to the model's limit around the mask(s) when longer."""
        ids = self.tokenizer(text, return_tensors=None)["input_ids"]
        if len(ids) <= self.max_length:
            return ids
        content = self.tokenizer(text, add_special_tokens=False, return_tensors=None)["input_ids"]
        lead = next(k for k in range(len(ids) - len(content) + 1) if ids[k : k + len(content)] == content)
        head, tail = ids[:lead], ids[lead + len(content) :]
        masks = [i for i, t in enumerate(content) if t == self.tokenizer.mask_token_id]
        budget = self.max_length - len(head) - len(tail)
        if not masks:
            return ids  # refused by the caller with the missing-mask message
        span = masks[-1] - masks[0] + 1
        if span > budget:
            raise ValueError(
                f"the masks of this text lie {span} tokens apart, more than the model's limit of {self.max_length} "
                f"tokens: {text[:60]!r}..."
            )
        start = max(0, min(masks[0] - (budget - span) // 2, len(content) - budget))
        logger.warning(
            "text of %d tokens is longer than the model's %d: keeping tokens %d-%d around the mask",
            len(ids),
            self.max_length,
            start,
            start + budget,
        )
        return head + content[start : start + budget] + tail

    @torch.inference_mode()
    def _predict(self, text: str, top_k: int) -> list[list[dict[str, Any]]]:
        ids = torch.tensor(self._window(text), device=self.device)
        positions = (ids == self.tokenizer.mask_token_id).nonzero().flatten()
        if len(positions) == 0:
            raise ValueError(f"no {self.tokenizer.mask_token} token in {text!r}; write it where a word is missing")
        inputs = {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]}
        if "token_type_ids" in self.tokenizer.model_input_names:
            inputs["token_type_ids"] = torch.zeros_like(ids)[None]
        probs = self.model(**inputs).logits[0, positions].float().softmax(-1)  # (M, V)
        best = probs.topk(min(top_k, probs.size(-1)), dim=-1)
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
                        # as transformers: with several masks the others stay visible, so special tokens are kept
                        "sequence": self.tokenizer.decode(filled.tolist(), skip_special_tokens=len(positions) == 1),
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
        top_k = self.top_k if top_k is None else top_k
        check_at_least("top_k", top_k)
        texts = [text] if isinstance(text, str) else list(text)
        out = []
        for t in texts:
            per_mask = self._predict(t, top_k)
            out.append(per_mask[0] if len(per_mask) == 1 else per_mask)
        return out[0] if isinstance(text, str) else out
