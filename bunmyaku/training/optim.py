"""AdamW (fused where the device supports it) and the learning-rate schedule: linear warmup, then decay."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from bunmyaku.training.args import TrainArgs

logger = logging.getLogger(__name__)


def build_optimizer(groups: list[dict[str, Any]], args: TrainArgs, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``groups``, with PyTorch's fused kernel on CUDA and CPU (falling back to foreach elsewhere)."""
    kwargs = {"lr": args.lr, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_eps}
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError) as error:
            logger.info("fused AdamW unavailable on %s (%s); using the foreach kernel", device, error)
    return torch.optim.AdamW(groups, **kwargs)


def lr_multiplier(step: int, args: TrainArgs) -> float:
    """The factor on the peak learning rate at ``step``: linear warmup, then cosine / linear decay to ``min_lr_ratio``.

    Step 0 (the first update) already has a non-zero rate: warmup reaches the peak after ``warmup_steps`` updates.
    """
    if step < args.warmup_steps:
        return (step + 1) / (args.warmup_steps + 1)
    if args.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if args.schedule == "cosine" else 1.0 - progress
    return args.min_lr_ratio + (1.0 - args.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArgs) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_multiplier` (its state is the step count, so it resumes exactly)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, args))
