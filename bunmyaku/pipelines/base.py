"""What every pipeline does first: find the model, load its tokenizer and the model with the right head."""

from __future__ import annotations

import os

import torch

from bunmyaku.hub.files import resolve_path
from bunmyaku.models import from_pretrained
from bunmyaku.pipelines import default_device
from bunmyaku.tokenization import Tokenizer


class Pipeline:
    """The shared opening: ``model`` (a folder, a hub repo id, or a GGUF file for decoders) resolved to a local
    path, its tokenizer, the model with the ``head`` the subclass names, in eval mode on ``device``.

    Args:
        model: a folder in HF layout, a hub repo id (``org/name`` or ``hf://org/name``), or a GGUF file.
        device: where to run; default CUDA when available.
        dtype: model dtype ("float32" default; "bfloat16" on GPU is faster).
    """

    head: str  # the ``task`` passed to :func:`bunmyaku.from_pretrained`

    def __init__(self, model: str | os.PathLike, device: str | None = None, dtype: str | torch.dtype | None = None):
        self.path = resolve_path(model)
        self.device = default_device(device)
        self.tokenizer = Tokenizer.from_pretrained(self.path)
        self.model = from_pretrained(self.path, task=self.head, device=self.device, dtype=dtype)
        self.name = str(model)


def check_at_least(name: str, value: int | None, minimum: int = 1) -> None:
    """Refuse a count below ``minimum`` (batch sizes, ``top_k``, beams, lengths) with a message naming it."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
