"""Plugins: techniques that change a training step without forking the loop.

The Trainer calls each plugin's hooks at fixed points of a step::

    on_fit_start                       model on its device, before DDP wrapping and the optimizer
    for each micro-batch: forward -> before_backward(loss) -> backward -> after_backward
    before_optimizer_step -> unscale, clip, step -> after_optimizer_step
    evaluation_context (around evaluation and the final export), on_evaluate(metrics)
    state_dict / load_state_dict (saved in every checkpoint)

A plugin that needs another forward / backward pass over the step's micro-batches (SAM, AWP) calls
``trainer.forward_backward()`` from ``before_optimizer_step``; one that changes parameter groups (layer-wise
learning-rate decay) overrides ``param_groups``.

Plugins are also the user's callbacks: ``bunmyaku.finetune(callbacks=[MyPlugin()])``, or ``callbacks:
[package.module:MyPlugin]`` in a recipe (a class is made without arguments). A plugin that only watches
(logging, recording) overrides the hooks it needs and returns nothing.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from bunmyaku.training.trainer import Trainer

logger = logging.getLogger(__name__)


class Plugin:
    """No-op hooks; subclasses override the ones they need."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Once, before DDP wrapping and the optimizer are built (freeze parameters here)."""

    def param_groups(self, trainer: Trainer, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Edit the optimizer's parameter groups before it is built."""
        return groups

    def before_backward(self, trainer: Trainer, loss: torch.Tensor) -> None:
        """After a micro-batch's forward, before its backward."""

    def after_backward(self, trainer: Trainer) -> None:
        """After a micro-batch's backward."""

    def before_optimizer_step(self, trainer: Trainer) -> None:
        """Gradients of the whole step are accumulated (still scaled under fp16); the optimizer has not stepped."""

    def after_optimizer_step(self, trainer: Trainer) -> None:
        """The optimizer and scheduler have stepped and gradients are cleared."""

    def evaluation_context(self, trainer: Trainer) -> contextlib.AbstractContextManager:
        """A context wrapped around evaluation and the final export (EMA swaps its weights in here)."""
        return contextlib.nullcontext()

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After an evaluation, with its metrics."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this plugin exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class EMA(Plugin):
    """An exponential moving average of the trainable weights, used for evaluation and the exported model.

    After every optimizer step ``shadow = decay * shadow + (1 - decay) * weight``. Averaged weights generalise
    a little better than the last iterate and are a common free gain in fine-tuning.

    Args:
        decay: the averaging factor, e.g. 0.999.
    """

    def __init__(self, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}

    def _params(self, trainer: Trainer) -> dict[str, nn.Parameter]:
        return {n: p for n, p in trainer.unwrapped_model.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer: Trainer) -> None:
        self.shadow = {n: p.detach().clone().float() for n, p in self._params(trainer).items()}

    @torch.no_grad()
    def after_optimizer_step(self, trainer: Trainer) -> None:
        for name, param in self._params(trainer).items():
            self.shadow[name].lerp_(param.float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def evaluation_context(self, trainer: Trainer) -> Iterator[None]:
        params = self._params(trainer)
        saved = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(saved[name])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, tensor in state["shadow"].items():
            self.shadow[name].copy_(tensor)


class Freeze(Plugin):
    """Stop training the embeddings and / or the first ``layers`` Transformer layers (the talk's memory tip).

    Parameters are matched by name: ``...embed...`` for embeddings, ``...layers.<i>.`` for layer ``i``.

    Args:
        embeddings: freeze the embeddings.
        layers: freeze layers 0 .. layers - 1.
    """

    _LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    _EMBED = re.compile(r"(?:^|\.)embed(?:dings)?\.")

    def __init__(self, embeddings: bool = False, layers: int = 0):
        self.embeddings = embeddings
        self.layers = layers

    def should_freeze(self, name: str) -> bool:
        """Whether parameter ``name`` is frozen."""
        if self.embeddings and self._EMBED.search(name):
            return True
        match = self._LAYER.search(name)
        return match is not None and int(match.group(1)) < self.layers

    def on_fit_start(self, trainer: Trainer) -> None:
        frozen = []
        for name, param in trainer.unwrapped_model.named_parameters():
            if self.should_freeze(name):
                param.requires_grad_(False)
                frozen.append(name)
        if not frozen:
            raise ValueError("freezing matched no parameter: the model has no 'embed' / 'layers.<i>' parameters")
        logger.info(
            "Froze %d parameter tensors (embeddings=%s, first %d layers)", len(frozen), self.embeddings, self.layers
        )
