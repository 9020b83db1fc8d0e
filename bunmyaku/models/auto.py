"""Pick the architecture and head for a checkpoint: ``bunmyaku.from_pretrained``."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch

from bunmyaku.hub import read_config, resolve_model_dir
from bunmyaku.models.base import PreTrainedModel

# HF ``model_type`` -> the module that implements it (each exposes ``TASKS``: task name -> class)
MODEL_TYPES = {
    "bert": "bunmyaku.models.bert",
    "roberta": "bunmyaku.models.roberta",
    "gpt2": "bunmyaku.models.gpt2",
    "llama": "bunmyaku.models.llama",
    "marian": "bunmyaku.models.transformer",
}

TASK_NAMES = (
    "base",
    "masked-lm",
    "causal-lm",
    "seq2seq-lm",
    "pretraining",
    "next-sentence",
    "sequence-classification",
    "token-classification",
    "question-answering",
    "multiple-choice",
    "pair-classification",
)


def model_classes(model_type: str) -> dict[str, type[PreTrainedModel]]:
    """Task name -> class for a HF ``model_type``."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; bunmyaku knows {sorted(MODEL_TYPES)}")
    return importlib.import_module(MODEL_TYPES[model_type]).TASKS


def model_class(model_type: str, task: str | None = None, architecture: str | None = None) -> type[PreTrainedModel]:
    """The class for a task (``"masked-lm"`` ...) or, when ``task`` is None, for a HF architecture name."""
    classes = model_classes(model_type)
    if task is not None:
        if task not in TASK_NAMES:
            raise ValueError(f"unknown task {task!r}; expected one of {list(TASK_NAMES)}")
        if task not in classes:
            raise ValueError(f"{model_type} has no {task!r} head; available: {sorted(classes)}")
        return classes[task]
    for cls in classes.values():
        if cls.hf_architecture == architecture:
            return cls
    return classes["base"]


def _gguf_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if found:
            return found[0]
    return None


def from_pretrained(
    path_or_repo_id: str | os.PathLike,
    task: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    compile: bool = False,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a model in HF layout (or a GGUF file) with the head for ``task``.

    Args:
        path_or_repo_id: a local HF folder, a hub repo id, or a ``.gguf`` file (Llama family).
        task: one of ``TASK_NAMES``; default: the head named in the checkpoint's ``architectures``.
        dtype: ``"float32"`` (default), ``"bfloat16"``, ``"float16"``, ``"auto"`` (the checkpoint's) or a torch dtype.
        device: ``"cpu"``, ``"cuda"``, ...
        compile: compile the model's forward with ``torch.compile`` (in place, ``nn.Module.compile``): the
            first calls for each new input shape are slow, later ones faster; parameter names are unchanged.
        kwargs: passed to the class's ``from_pretrained`` (``num_labels``, ``ignore_mismatched_sizes``,
            config overrides such as ``attn_implementation="eager"``).

    Returns:
        The model in eval mode.

    Example:
        >>> model = bunmyaku.from_pretrained("path/to/all-MiniLM-L6-v2")
        >>> out = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, 384)
    """
    local = Path(path_or_repo_id).expanduser()
    gguf = _gguf_file(local)
    if gguf is not None:
        from bunmyaku.models.llama import from_gguf

        model = from_gguf(gguf, task=task or "causal-lm", dtype=dtype, device=device, **kwargs)
    else:
        model_dir = resolve_model_dir(path_or_repo_id)
        config = read_config(model_dir)
        model_type = config.get("model_type")
        if model_type is None:
            raise ValueError(f"{model_dir / 'config.json'} has no 'model_type' field; expected e.g. 'bert' or 'gpt2'")
        architectures = config.get("architectures") or [None]
        cls = model_class(model_type, task, architectures[0])
        model = cls.from_pretrained(model_dir, dtype=dtype, device=device, **kwargs)
    if compile:
        model.compile()
    return model
