"""Sentence vectors from token states (sentence-transformers' Pooling): mean over real tokens, or [CLS]."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the real tokens' states: (B, T, C), (B, T) -> (B, C)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def cls_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The first token's state: (B, T, C) -> (B, C)."""
    return hidden[:, 0]


POOLING = {"mean": mean_pool, "cls": cls_pool}


def pool(
    hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean", normalize: bool = False
) -> torch.Tensor:
    """Pool token states into one vector per sequence, optionally L2-normalised.

    Args:
        hidden: (B, T, C) token states.
        attention_mask: (B, T) 1 for real tokens.
        mode: "mean" or "cls".
        normalize: divide each vector by its L2 norm (cosine similarity becomes a dot product).

    Returns:
        (B, C)
    """
    if mode not in POOLING:
        raise ValueError(f"pooling mode {mode!r}: expected one of {sorted(POOLING)}")
    vectors = POOLING[mode](hidden, attention_mask)
    return F.normalize(vectors, p=2, dim=-1) if normalize else vectors
