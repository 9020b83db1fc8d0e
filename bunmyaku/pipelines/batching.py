"""Shared pieces of the task pipelines: length-sorted batches, model inputs, label maps, length limits."""

from __future__ import annotations

from collections.abc import Iterator

import torch

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def length_sorted_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Indices of the inputs, longest first, in chunks of ``batch_size``: each batch pads to similar lengths."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def model_inputs(batch: dict[str, torch.Tensor], device: str, rows: list[int] | None = None) -> dict[str, torch.Tensor]:
    """The tensors a model's ``forward`` takes, for ``rows`` (all by default), cut to the longest real row."""
    picked = {k: v if rows is None else v[rows] for k, v in batch.items() if k in MODEL_INPUTS}
    length = int(picked["attention_mask"].sum(1).max()) if "attention_mask" in picked else None
    return {k: v[:, :length].to(device) for k, v in picked.items()}


def label_names(config) -> dict[int, str]:
    """``config.id2label``, or ``LABEL_i`` names when the checkpoint has none."""
    return dict(config.id2label) if config.id2label else {i: f"LABEL_{i}" for i in range(config.num_labels)}


def max_input_length(tokenizer, config, requested: int | None = None) -> int:
    """The token limit: ``requested``, else the tokenizer's ``model_max_length``, else the model's positions."""
    limits = [n for n in (tokenizer.model_max_length, config.max_seq_len) if n]
    return requested or (min(limits) if limits else 512)
