"""Training objectives: how a batch becomes per-term loss *sums* and target counts.

The Trainer normalises: it counts every term's targets over all micro-batches of a step (and all processes)
before the first backward, then back-propagates ``sum_t loss_sum_t / global_count_t``. The accumulated gradient
is then the full-batch gradient even when micro-batches hold different numbers of targets, which averaging
per-micro-batch means (``transformers``' long-standing bug) gets wrong.

An objective is a callable ``objective(model, batch) -> (loss sums, metric sums)`` with a ``count(batch)``
method; both return dicts keyed by term (``"lm"``, ``"nsp"``).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from bunmyaku.models.heads import IGNORE_INDEX, next_token_labels

Sums = dict[str, torch.Tensor]


def _inputs(batch: dict[str, torch.Tensor], exclude: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k not in exclude}


def _token_sums(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and number of correct argmaxes over (N, V) logits and (N,) targets, -100 ignored."""
    logits = logits.reshape(-1, logits.size(-1)).float()
    targets = targets.reshape(-1)
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        correct = ((logits.argmax(-1) == targets) & (targets != IGNORE_INDEX)).sum()
    return loss, correct


class TokenObjective:
    """Shared by the token-level objectives: the loss and accuracy sums over logits, compilable."""

    token_sums = staticmethod(_token_sums)

    def compile(self) -> None:
        """Compile the loss: the float32 upcast, log-softmax, NLL and argmax over (N, V) logits fuse into a few
        reductions instead of several full-size float32 copies (the largest tensors of a language-model step)."""
        self.token_sums = torch.compile(_token_sums)


class CausalLM(TokenObjective):
    """Next-token prediction: ``labels`` (B, T) as for HF (the ids themselves; position t predicts t + 1)."""

    def count(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """Scored positions per term."""
        return {"lm": int((next_token_labels(batch["labels"]) != IGNORE_INDEX).sum())}

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[Sums, Sums]:
        logits = model(**_inputs(batch, ("labels",))).logits  # (B, T, V)
        loss, correct = self.token_sums(logits, next_token_labels(batch["labels"]))  # labels shifted, not logits
        return {"lm": loss}, {"lm_correct": correct}


def _accepts(model: nn.Module, name: str) -> bool:
    forward = getattr(model, "module", model).forward
    return name in inspect.signature(forward).parameters


class MaskedLM(TokenObjective):
    """Masked-token prediction: ``labels`` (B, T) original ids at masked positions, -100 elsewhere.

    When the model's ``forward`` takes ``masked_only``, the vocabulary projection runs only at the masked
    positions (about 15% of them), which is most of the head's cost for a large vocabulary.
    """

    logits_field = "logits"

    def count(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """Masked positions per term."""
        return {"lm": int((batch["labels"] != IGNORE_INDEX).sum())}

    def _forward(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        labels = batch["labels"]
        inputs = _inputs(batch, ("labels", "next_sentence_label"))
        if _accepts(model, "masked_only"):
            out = model(**inputs, labels=labels, masked_only=True)
            return out, labels[labels != IGNORE_INDEX]  # logits (M, V) for the M masked positions
        return model(**inputs), labels

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[Sums, Sums]:
        out, targets = self._forward(model, batch)
        loss, correct = self.token_sums(getattr(out, self.logits_field), targets)
        return {"lm": loss}, {"lm_correct": correct}


class MaskedLMWithNSP(MaskedLM):
    """BERT's pretraining loss: masked LM (per masked token) + next-sentence prediction (per pair)."""

    logits_field = "prediction_logits"

    def count(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """Masked positions and sentence pairs."""
        return {**super().count(batch), "nsp": len(batch["next_sentence_label"])}

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[Sums, Sums]:
        out, targets = self._forward(model, batch)
        lm_loss, lm_correct = self.token_sums(out.prediction_logits, targets)
        nsp_loss, nsp_correct = _token_sums(out.seq_relationship_logits, batch["next_sentence_label"])
        return {"lm": lm_loss, "nsp": nsp_loss}, {"lm_correct": lm_correct, "nsp_correct": nsp_correct}


class ReplacedTokenDetection(TokenObjective):
    """ELECTRA's loss for a :class:`~bunmyaku.training.rtd.ReplacedTokenDetection` model: the generator's masked LM
    (term ``lm``, per masked token) + ``rtd_weight`` x the discriminator's binary cross-entropy (term ``rtd``, per
    real token; logged as that weighted term, ``rtd_bce`` unweighted).

    Metrics: ``accuracy`` (the generator's, at the masked positions), ``rtd_accuracy`` (the discriminator's, every
    real token), ``rtd_precision`` / ``rtd_recall`` on the replaced tokens (logit > 0 predicts "replaced"), and
    ``replaced_fraction`` (the share of real tokens replaced: below the mask rate as the generator learns).
    Ratios are reported as ``<name>_num`` / ``<name>_den`` sums, divided after summing over micro-batches.

    Args:
        rtd_weight: lambda, the RTD loss's weight (50 in ELECTRA and DeBERTa-v3).
    """

    def __init__(self, rtd_weight: float = 50.0):
        self.rtd_weight = rtd_weight

    def count(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """Masked positions (``lm``) and real tokens (``rtd``)."""
        mask = batch.get("attention_mask")
        real = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return {"lm": int((batch["labels"] != IGNORE_INDEX).sum()), "rtd": real}

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[Sums, Sums]:
        out = model(**_inputs(batch, ("next_sentence_label",)))
        lm_loss, lm_correct = self.token_sums(out.logits, out.mlm_labels)
        logits, labels = out.rtd_logits.float(), out.rtd_labels.float()
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        with torch.no_grad():
            predicted, replaced = logits > 0, labels > 0.5
            hits = (predicted & replaced).sum()
            metrics = {
                "lm_correct": lm_correct,
                "rtd_correct": (predicted == replaced).sum(),
                "rtd_bce_num": bce.detach(),
                "rtd_bce_den": torch.tensor(labels.numel(), device=logits.device),
                "rtd_precision_num": hits,
                "rtd_precision_den": predicted.sum(),
                "rtd_recall_num": hits,
                "rtd_recall_den": replaced.sum(),
                "replaced_fraction_num": replaced.sum(),
                "replaced_fraction_den": torch.tensor(labels.numel(), device=logits.device),
            }
        return {"lm": lm_loss, "rtd": self.rtd_weight * bce}, metrics


OBJECTIVES = {
    "causal-lm": CausalLM,
    "masked-lm": MaskedLM,
    "pretraining": MaskedLMWithNSP,
    "replaced-token-detection": ReplacedTokenDetection,
}


def objective_for(model: nn.Module):
    """The objective matching a model's ``task`` (causal-lm, masked-lm, pretraining)."""
    task = getattr(getattr(model, "module", model), "task", None)
    if task not in OBJECTIVES:
        raise ValueError(f"no default objective for task {task!r}; pass objective= (known: {sorted(OBJECTIVES)})")
    return OBJECTIVES[task]()
