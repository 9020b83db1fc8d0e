"""Adversarial and sharpness-aware training plugins: FGM, AWP and SAM / ASAM.

All three act in ``before_optimizer_step``, when the gradient of the whole optimizer step (every micro-batch
of the accumulation) is in ``.grad``. Each perturbs the weights along that gradient, calls
``trainer.forward_backward()`` (which re-runs *all* the step's micro-batches: the second pass costs a second
full step of forward / backward), and puts the weights back before the optimizer steps:

- FGM and AWP add the adversarial gradient to the clean one (the optimizer steps on their sum);
- SAM replaces the clean gradient by the one at the perturbed point.

The logged training loss is the first (clean) pass's. Under fp16 the gradients here are still multiplied by
the GradScaler's scale: the perturbation is computed from the unscaled gradient (its direction ``g / ||g||`` is
the same either way; its finiteness decides), and when that gradient is not finite (the scaler is about to skip
the step) nothing is perturbed and no second pass runs.

Under DDP the gradient here is already all-reduced (the step's last micro-batch syncs), so every process perturbs
the same weights by the same amount; the second pass syncs again on its last micro-batch, so the gradient the
optimizer steps with is the whole batch's: 2 processes with half the batch each train exactly like 1 with all of it
(not SAM's per-device "m-sharpness" variant, whose result would change with the number of processes).

Under sharding (FSDP / HSDP) and tensor parallelism the weights and gradients are DTensors, each process holding its
shards: every norm here is the one over all shards and processes (:func:`~bunmyaku.training.sharding.global_norm`,
a collective), the perturbations are then added and removed shard by shard, and the second pass runs under the same
sharding (its gradients reduce-scattered again on the last micro-batch), so the sharded run trains as 1 process does.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from bunmyaku.training.plugins import Plugin, step_epoch
from bunmyaku.training.sharding import all_finite, global_norm

if TYPE_CHECKING:
    from bunmyaku.training.trainer import Trainer

logger = logging.getLogger(__name__)


def unscaled_grads(trainer: Trainer, params: list[nn.Parameter]) -> list[torch.Tensor] | None:
    """The parameters' gradients divided by the fp16 loss scale (None where a parameter has no gradient), or
    None altogether when any of them is not finite on any process: the GradScaler will skip this step, so nothing is
    perturbed."""
    scale = trainer.scaler.get_scale() if trainer.scaler is not None else 1.0
    grads = [None if p.grad is None else p.grad.detach().float() / scale for p in params]
    if not all_finite([g for g in grads if g is not None]):
        return None
    return grads


def second_pass(trainer: Trainer, params: list[nn.Parameter], saved: list[torch.Tensor]) -> None:
    """Run the step's micro-batches forward and backward at the perturbed weights, then restore ``saved`` (also
    when the pass fails, so an error never leaves perturbed weights behind)."""
    try:
        trainer.forward_backward()
    finally:
        with torch.no_grad():
            for param, original in zip(params, saved, strict=True):
                param.copy_(original)


class FGM(Plugin):
    """Fast Gradient Method (Miyato et al. 2017) on the word embeddings.

    With ``g`` the step's gradient of the input embedding matrix, the embeddings move to ``E + epsilon * g /
    ||g||``; the step's micro-batches are run forward and backward again there (the gradients add up) and the
    embeddings are restored before the optimizer steps.

    Args:
        epsilon: the perturbation's norm.
    """

    def __init__(self, epsilon: float = 1.0):
        if not epsilon > 0:
            raise ValueError(f"FGM epsilon must be > 0, got {epsilon}")
        self.epsilon = epsilon

    def on_fit_start(self, trainer: Trainer) -> None:
        if not callable(getattr(trainer.unwrapped_model, "get_input_embeddings", None)):
            raise ValueError(f"fgm perturbs the word embeddings: {type(trainer.unwrapped_model).__name__} has none")
        if not trainer.unwrapped_model.get_input_embeddings().weight.requires_grad:
            raise ValueError("fgm needs the word embeddings' gradient: they are frozen (freeze_embeddings)")

    def before_optimizer_step(self, trainer: Trainer) -> None:
        weight = trainer.unwrapped_model.get_input_embeddings().weight
        if weight.grad is None:
            return
        grads = unscaled_grads(trainer, [weight])
        if grads is None:
            return
        norm = global_norm(grads)  # over every shard of the table
        if norm == 0:
            return
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.add_((self.epsilon * grads[0] / norm).to(weight.dtype))
        second_pass(trainer, [weight], [saved])


class AWP(Plugin):
    """Adversarial Weight Perturbation (Wu et al. 2020), as popularised by the Feedback Prize winners.

    From epoch ``start_epoch`` on, every trainable matrix ``w`` (biases and norm weights, the 1-D tensors, are
    left alone) moves by ``lr * ||w|| * g / ||g||``, clamped to ``[w - eps |w|, w + eps |w|]``; the step's
    micro-batches are run forward and backward again (the gradients add up) and the weights are restored before
    the optimizer steps.

    Args:
        lr: the perturbation's size relative to each weight's norm.
        eps: the largest relative change of any single weight.
        start_epoch: the first epoch (0-based) that is perturbed.
    """

    def __init__(self, lr: float = 1.0, eps: float = 0.01, start_epoch: float = 0):
        if not lr > 0 or not eps > 0:
            raise ValueError(f"AWP lr and eps must be > 0, got {lr}, {eps}")
        self.lr, self.eps, self.start_epoch = lr, eps, start_epoch

    def epoch(self, trainer: Trainer) -> float:
        """The (fractional) epoch of the step about to be taken."""
        return step_epoch(trainer)

    def before_optimizer_step(self, trainer: Trainer) -> None:
        if self.epoch(trainer) < self.start_epoch:
            return
        params = [p for p in trainer.unwrapped_model.parameters() if p.requires_grad and p.ndim >= 2]
        params = [p for p in params if p.grad is not None]
        grads = unscaled_grads(trainer, params)
        if grads is None:
            return
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for param, grad, original in zip(params, grads, saved, strict=True):
                g_norm = global_norm([grad])  # each matrix's norms over all its shards
                if g_norm == 0:
                    continue
                w = original.float()
                bound = self.eps * w.abs()
                moved = w + self.lr * global_norm([w]) * grad / g_norm
                param.copy_(torch.minimum(torch.maximum(moved, w - bound), w + bound))
        second_pass(trainer, params, saved)


class SAM(Plugin):
    """Sharpness-Aware Minimization (Foret et al. 2021), or Adaptive SAM (Kwon et al. 2021).

    With ``g`` the step's gradient over all trainable weights, the weights move to ``w + e``, ``e = rho * g /
    ||g||`` (ASAM: ``e = rho * w^2 g / ||w g||``, elementwise products); the gradient is recomputed there over the
    step's micro-batches, the weights are put back to ``w``, and the optimizer steps with that second gradient.

    Args:
        rho: the neighbourhood's radius.
        adaptive: ASAM's scale-invariant neighbourhood.
    """

    def __init__(self, rho: float = 0.05, adaptive: bool = False):
        if not rho > 0:
            raise ValueError(f"SAM rho must be > 0, got {rho}")
        self.rho, self.adaptive = rho, adaptive

    def before_optimizer_step(self, trainer: Trainer) -> None:
        params = [p for p in trainer.unwrapped_model.parameters() if p.requires_grad and p.grad is not None]
        grads = unscaled_grads(trainer, params)
        if grads is None or not params:
            return
        saved = [p.detach().clone() for p in params]
        scaled = [(w.float().square() * g if self.adaptive else g) for w, g in zip(saved, grads, strict=True)]
        # ||w g|| for ASAM; ||g|| for SAM
        denominators = [(w.float().abs() * g if self.adaptive else g) for w, g in zip(saved, grads, strict=True)]
        norm = global_norm(denominators)  # over every weight and every shard
        if norm == 0:
            return
        with torch.no_grad():
            for param, s in zip(params, scaled, strict=True):
                param.add_((self.rho * s / norm).to(param.dtype))
        for param in params:
            param.grad = None
        second_pass(trainer, params, saved)


def adversarial_plugins(args: object) -> list[Plugin]:
    """The plugins switched on by ``TrainArgs``'s ``fgm``, ``awp_lr`` / ``awp_eps`` / ``awp_start_epoch``,
    ``sam`` and ``sam_adaptive``."""
    plugins: list[Plugin] = []
    if getattr(args, "fgm", 0.0):
        plugins.append(FGM(args.fgm))
    if getattr(args, "awp_lr", 0.0):
        plugins.append(AWP(args.awp_lr, args.awp_eps, args.awp_start_epoch))
    if getattr(args, "sam", 0.0):
        plugins.append(SAM(args.sam, args.sam_adaptive))
    return plugins
