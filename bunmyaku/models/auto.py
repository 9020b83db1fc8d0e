"""Pick the architecture and head for a checkpoint: ``bunmyaku.from_pretrained``."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch

from bunmyaku.hub import read_config, resolve_model_dir
from bunmyaku.hub.files import checkpoint_keys
from bunmyaku.models.base import PreTrainedModel

# HF ``model_type`` -> the module that implements it (each exposes ``TASKS``: task name -> class)
MODEL_TYPES = {
    "bert": "bunmyaku.models.bert",
    "roberta": "bunmyaku.models.roberta",
    "modernbert": "bunmyaku.models.modernbert",
    "deberta": "bunmyaku.models.deberta_v1",
    "deberta-v2": "bunmyaku.models.deberta",
    "longformer": "bunmyaku.models.longformer",
    "big_bird": "bunmyaku.models.big_bird",
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


# A checkpoint saved with the head named on the right also holds trained weights for the head on the left.
HEADS_WITHIN = {
    ("masked-lm", "pretraining"),  # BertForPreTraining: the MLM head and the NSP head
    ("next-sentence", "pretraining"),
    ("causal-lm", "pair-classification"),  # GPT2DoubleHeadsModel: the LM head and the choice head
}


def check_head(model_dir: Path, config: dict[str, Any], cls: type[PreTrainedModel], needed_by: str) -> None:
    """Refuse a checkpoint that lacks trained weights for ``cls``'s head, before anything is loaded.

    The head counts as present when the checkpoint holds tensors of that head (or the head has none of its
    own: a vocabulary projection tied to the token embeddings) and its ``architectures`` names that head, a
    head that contains it, or an architecture bunmyaku does not know. So a base model is refused for
    fill-mask, and a sentence classifier for token classification, although both would load with a newly
    initialised (random) head.

    Raises:
        ValueError: one line naming the folder, its ``architectures`` and the head ``needed_by`` needs.
    """
    if cls.task == "base":
        return
    with torch.device("meta"):  # the model's parameter names and ties, without memory or initialisation
        model = cls(cls.configure(config))
    tied = model.tied_weights()
    own = [k for k in model.state_dict() if model._is_head(k) and k not in tied]
    has_weights = not own or any(cls._hf_to_ours(k)[0] == "head" for k in checkpoint_keys(model_dir))
    architectures = config.get("architectures") or []
    known = {c.hf_architecture: c.task for c in model_classes(config["model_type"]).values()}
    saved = known.get(architectures[0]) if architectures else None
    fits = saved in (None, cls.task) or (cls.task, saved) in HEADS_WITHIN or (saved == "base" and not own)
    if has_weights and fits:
        return
    have = f"architectures {architectures}" if architectures else "no 'architectures' in config.json"
    lacks = f"and no trained {cls.task} weights" if not has_weights else f"(a {saved} head)"
    raise ValueError(
        f"{model_dir}: {needed_by} needs a model with a {cls.task} head ({cls.hf_architecture}), but this one has "
        f"{have} {lacks}; give a model trained for {cls.task}, or fine-tune one with `bunmyaku finetune`"
    )


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
    needed_by: str | None = None,
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
        needed_by: who will use the head (``"the fill-mask pipeline"``): when given, a checkpoint without trained
            weights for the ``task`` head is refused (see :func:`check_head`) instead of loaded with a random one.
        kwargs: passed to the class's ``from_pretrained`` (``num_labels``, ``ignore_mismatched_sizes``,
            config overrides such as ``attn_implementation="eager"``).

    Returns:
        The model in eval mode.

    Raises:
        ValueError: an unknown ``model_type`` or task, or (with ``needed_by``) a checkpoint without that head.

    Example:
        >>> model = bunmyaku.from_pretrained("path/to/all-MiniLM-L6-v2")
        >>> out = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, 384)
    """
    local = Path(path_or_repo_id).expanduser()
    gguf = _gguf_file(local)
    if local.is_dir() and (local / "adapter_config.json").is_file():  # a PEFT adapter: its base model + the adapter
        from bunmyaku.models.lora import load_adapter

        model = load_adapter(local, task=task, dtype=dtype, device=device, **kwargs)
    elif gguf is not None:
        from bunmyaku.models.llama import from_gguf

        model = from_gguf(gguf, task=task or "causal-lm", dtype=dtype, device=device, **kwargs)
    else:
        model_dir = resolve_model_dir(path_or_repo_id)
        config = read_config(model_dir)
        model_type = config.get("model_type")
        if model_type is None:
            raise ValueError(f"{model_dir / 'config.json'} has no 'model_type' field; expected e.g. 'bert' or 'gpt2'")
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"{model_dir / 'config.json'}: model_type {model_type!r} is not supported; "
                f"bunmyaku knows {sorted(MODEL_TYPES)}"
            )
        architectures = config.get("architectures") or [None]
        if needed_by is not None and task in TASK_NAMES and task not in model_classes(model_type):
            raise ValueError(
                f"{model_dir}: {needed_by} needs a model with a {task} head, but this one has architectures "
                f"{config.get('architectures')} and {model_type} models have no {task} head in bunmyaku "
                f"(they have {sorted(model_classes(model_type))})"
            )
        cls = model_class(model_type, task, architectures[0])
        if needed_by is not None:
            check_head(model_dir, config, cls, needed_by)
        model = cls.from_pretrained(model_dir, dtype=dtype, device=device, **kwargs)
    if compile:
        model.compile()
    return model
