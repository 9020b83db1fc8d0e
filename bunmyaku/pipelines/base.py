"""What every pipeline does first: find the model, load its tokenizer and the model with the right head."""

from __future__ import annotations

import os

import torch

from bunmyaku.hub.files import resolve_path
from bunmyaku.models import from_pretrained
from bunmyaku.pipelines import default_device
from bunmyaku.tokenization import Tokenizer


class Pipeline:
    """The shared opening: ``model`` (a folder, a finetune run folder holding ``model/``, a hub repo id, or a GGUF
    file for decoders) resolved to a local path, its tokenizer, the model with the ``head`` the subclass names, in
    eval mode on ``device``. A checkpoint without trained weights for that head is a ``ValueError``.

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
        # a checkpoint without this head is refused, not run with a newly initialised (random) one
        needed_by = f"the {self.task_name()} pipeline"
        self.model = from_pretrained(self.path, task=self.head, device=self.device, dtype=dtype, needed_by=needed_by)
        self.name = str(model)

    @classmethod
    def task_name(cls) -> str:
        """The task name this pipeline is registered under (``"fill-mask"``), else the class name."""
        from bunmyaku.pipelines import PIPELINES

        names = [task for task, (_, name) in PIPELINES.items() if name == cls.__name__]
        return names[0] if names else cls.__name__


def check_at_least(name: str, value: int | None, minimum: int = 1) -> None:
    """Refuse a count below ``minimum`` (batch sizes, ``top_k``, beams, lengths) with a message naming it."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
