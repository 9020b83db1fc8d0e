"""Helpers for parity tests against ``transformers``: random tiny models saved to folders, output comparison."""

from __future__ import annotations

from pathlib import Path

import torch

ATOL = 1e-5


def randomize(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter (norm weights and biases included), so no tensor stays at a trivial init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def save(model, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    return path


def assert_close(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor | None = None, atol: float = ATOL):
    """Max abs difference <= atol, on real positions only when ``mask`` (B, T) is given."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if mask is not None:
        actual, expected = actual[mask.bool()], expected[mask.bool()]
    diff = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    assert diff <= atol, f"max abs difference {diff:.3g} > {atol}"


def right_padded_batch(vocab: int, batch: int = 3, length: int = 9, seed: int = 0, low: int = 3):
    """Random ids with right padding of varied lengths (the first row full, one row of length 2)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        mask[row, max(2, length - 2 * row - 1) :] = 0
    return ids, mask


def left_padded_batch(vocab: int, batch: int = 3, length: int = 9, seed: int = 0, low: int = 3):
    """Random ids with left padding (decoders), plus the position ids that skip the padding."""
    ids, mask = right_padded_batch(vocab, batch, length, seed, low)
    mask = mask.flip(-1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions
