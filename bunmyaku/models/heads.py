"""Losses shared by the task heads of every architecture, with HF's conventions, and multi-sample dropout.

Labels equal to -100 are ignored everywhere (padding, sub-tokens after the first, unmasked positions).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bunmyaku.models.base import ModelOutput

IGNORE_INDEX = -100


def flatten_choices(num_rows: int, num_choices: int, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Multiple-choice inputs (B, N, T, ...) as (B * N, T, ...) sequences for the encoder; None stays None."""
    return [None if t is None else t.reshape(num_rows * num_choices, *t.shape[2:]) for t in tensors]


def infer_problem_type(config, labels: torch.Tensor) -> str:
    """HF's rule when ``problem_type`` is unset: 1 label: regression; integer labels: single-label; else multi-label."""
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def sequence_classification_loss(config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits: (B, L); labels: (B,) class ids, (B,) or (B, L) floats for regression, (B, L) 0/1 for multi-label."""
    problem = infer_problem_type(config, labels)
    if problem == "regression":
        if config.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1), labels.squeeze(-1).to(logits.dtype))
        return F.mse_loss(logits, labels.to(logits.dtype))
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1), ignore_index=IGNORE_INDEX)
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over (B, T, V) logits and (B, T) labels, -100 ignored, averaged over counted tokens."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """(..., T) labels -> each position's target: the label one to the right; the last position scores nothing.

    A causal LM's loss shifts the labels rather than the logits: slicing (B, T, V) logits to T - 1 positions
    copies them to flatten, and the slice's backward writes a zero-filled full-size gradient, both the size of
    the largest tensor of a language-model step.
    """
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def shifted_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss (HF's convention): logits (..., T, V) at position t are scored against labels (..., T) at
    t + 1, -100 ignored, averaged over the scored positions."""
    return token_loss(logits, next_token_labels(labels))


def span_loss(
    start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor, end_positions: torch.Tensor
) -> torch.Tensor:
    """Extractive QA: mean of start and end cross-entropies; positions outside the window are ignored."""
    T = start_logits.size(1)
    start = start_positions.view(-1).clamp(0, T)
    end = end_positions.view(-1).clamp(0, T)
    return (F.cross_entropy(start_logits, start, ignore_index=T) + F.cross_entropy(end_logits, end, ignore_index=T)) / 2


def check_logits_to_keep(logits_to_keep: int, labels: torch.Tensor | None) -> None:
    """A loss needs every position's logits, so ``logits_to_keep`` and ``labels`` exclude each other."""
    if logits_to_keep and labels is not None:
        raise ValueError("logits_to_keep cannot be combined with labels: the loss needs every position's logits")


def causal_lm_output(
    lm_head: Callable[[torch.Tensor], torch.Tensor], out: ModelOutput, labels: torch.Tensor | None, logits_to_keep: int
) -> ModelOutput:
    """A decoder's output -> next-token logits (B, T or ``logits_to_keep``, V) and, with labels, the shifted loss."""
    logits = lm_head(out.last_hidden_state[:, -logits_to_keep:])  # logits_to_keep = 0 keeps every position
    loss = shifted_lm_loss(logits, labels) if labels is not None else None
    return ModelOutput(loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states)


def multi_sample(
    model: nn.Module,
    classify: Callable[[], torch.Tensor],
    loss_of: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A classification head's logits and loss, with multi-sample dropout while training (Inoue 2019).

    In training mode with ``model.multi_sample_dropout = N`` (> 1), ``classify`` (the head's dropout and
    classifier) runs N times, each with its own dropout masks, and the loss is the mean of the N losses, as in the
    paper (a mean of the N logits would, for a linear classifier, be one pass with a milder mask: less of the
    regularisation the extra samples are for). The returned logits are the N logits' mean. In eval mode dropout is
    the identity, so one pass gives the plain head's output. No weight is added: the model saves and loads as it
    always does.

    Args:
        model: the head model; its ``multi_sample_dropout`` attribute is N (1: one pass).
        classify: runs the head's dropout + classifier on the encoder output, returning logits.
        loss_of: logits -> the mean loss, or None without labels.

    Returns:
        ``(logits, loss)``; ``loss`` is None without ``loss_of``.
    """
    samples = model.multi_sample_dropout if model.training else 1
    logits = [classify() for _ in range(samples)]
    loss = None if loss_of is None else torch.stack([loss_of(x) for x in logits]).mean()
    return (logits[0] if samples == 1 else torch.stack(logits).mean(0)), loss
