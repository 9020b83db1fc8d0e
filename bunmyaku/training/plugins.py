"""Plugins: techniques that change a training step without forking the loop.

The Trainer calls each plugin's hooks at fixed points of a step::

    on_fit_start                       model on its device, before DDP or FSDP wrapping and the optimizer
    on_train_start                     wrapped or sharded, optimizer built, before resuming a checkpoint
    for each micro-batch: forward -> before_backward(loss) -> backward -> after_backward
    before_optimizer_step -> unscale, clip, step -> after_optimizer_step
    evaluation_context (around evaluation and the final export), on_evaluate(metrics)
    state_dict / load_state_dict (saved in every checkpoint)

Plugins that act from an epoch on (AWP, SWA) read the epoch of a step with :func:`step_epoch`.

Under sharding (FSDP / HSDP) and tensor parallelism every parameter and gradient is a DTensor: this process's shard
of it. A plugin's per-parameter state made in ``on_train_start`` from the parameters (EMA's and SWA's averages) is
sharded alike, and element-wise updates (``lerp_``, ``copy_``) act on each process's shard alone; the Trainer saves
such state with the sharded checkpoint (each process its shards, through DCP) and gathers it only for the export.

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
import math
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.swa_utils import get_swa_multi_avg_fn

if TYPE_CHECKING:
    from bunmyaku.training.trainer import Trainer

logger = logging.getLogger(__name__)


class Plugin:
    """No-op hooks; subclasses override the ones they need."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Once, before DDP or FSDP wrapping and the optimizer are built (freeze parameters here)."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Once, after wrapping or sharding (DDP, FSDP, TP) and the optimizer, before a checkpoint is resumed: keep
        per-parameter state here (a clone of a sharded parameter is sharded, so no process holds a whole copy)."""

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


@contextlib.contextmanager
def swapped_in(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Hold ``values`` (an average of the weights) in ``params`` for the ``with`` block, then put the trained
    weights back (also after an error)."""
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(values[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved[name])


class EMA(Plugin):
    """An exponential moving average of the trainable weights, used for evaluation and the exported model.

    After every optimizer step ``shadow = decay * shadow + (1 - decay) * weight``. Averaged weights generalise
    a little better than the last iterate and are a common free gain in fine-tuning. Under sharding the shadow is
    sharded like the weights (each process averages its own shards), saved with the sharded checkpoint, and gathered
    whole only for the export.

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

    def on_train_start(self, trainer: Trainer) -> None:
        self.shadow = {n: p.detach().clone().float() for n, p in self._params(trainer).items()}

    @torch.no_grad()
    def after_optimizer_step(self, trainer: Trainer) -> None:
        for name, param in self._params(trainer).items():
            self.shadow[name].lerp_(param.float(), 1.0 - self.decay)

    def evaluation_context(self, trainer: Trainer) -> contextlib.AbstractContextManager:
        return swapped_in(self._params(trainer), self.shadow)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, tensor in state["shadow"].items():
            self.shadow[name].copy_(tensor)


def step_epoch(trainer: Trainer, step: int | None = None) -> float:
    """The (0-based, fractional) epoch in which optimizer step ``step`` (0-based; default: the one being taken,
    ``trainer.step``) runs: the micro-batches drawn before it over the micro-batches per epoch."""
    per_epoch = max(getattr(trainer.train_stream, "batches_per_epoch", 1), 1)
    return (trainer.step if step is None else step) * trainer.args.grad_accum_steps / per_epoch


class SWA(Plugin):
    """Stochastic weight averaging (Izmailov et al. 2018): the equal-weight average of the iterates of the last
    epochs, used for evaluation and the exported model.

    From epoch ``start`` on (0-based, fractions allowed: see :func:`step_epoch`), the trainable weights after every
    optimizer step join a running mean, ``avg_n = avg_{n-1} + (w - avg_{n-1}) / n``, updated with
    ``torch.optim.swa_utils.get_swa_multi_avg_fn`` on fp32 copies. Torch's documentation example calls
    ``AveragedModel.update_parameters`` once per epoch, which in a fine-tuning run of a few epochs leaves one or two
    snapshots, so every step's iterate is averaged here. Before the first averaged step, evaluation sees the plain
    weights; when the Trainer keeps the best evaluation (fine-tuning does), the exported model is the weights of
    that evaluation: the average when it came after ``start``.

    The learning rate keeps the run's schedule unless ``lr`` is given: then every averaged step runs at the
    constant rate ``lr`` (the paper's constant SWA rate; torch's ``SWALR`` with ``anneal_epochs=0``), each parameter
    group at ``lr`` times its own factor (layer-wise decay's ratios are kept). A step the fp16 GradScaler skips
    (an inf in the gradient) leaves the weights as they were and is not averaged again.

    SWA recomputes BatchNorm statistics for the averaged weights (``swa_utils.update_bn``); Transformers normalise
    with LayerNorm, which has no running statistics, so nothing needs recomputing. Under sharding the average is
    sharded like the weights, as EMA's is.

    Args:
        start: the first epoch whose steps are averaged (> 0).
        lr: the constant learning rate of the averaged steps (0: the run's schedule).
    """

    def __init__(self, start: float, lr: float = 0.0):
        if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0 < start < math.inf:
            raise ValueError(f"swa_start must be a finite number of epochs > 0, got {start!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 <= lr < math.inf:
            raise ValueError(f"swa_lr must be a finite number >= 0, got {lr!r}")
        self.start, self.lr = start, lr
        self.average: dict[str, torch.Tensor] = {}
        self.count = 0
        self._update = get_swa_multi_avg_fn()
        self._scale: float | None = None

    def _params(self, trainer: Trainer) -> dict[str, nn.Parameter]:
        return {n: p for n, p in trainer.unwrapped_model.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer: Trainer) -> None:
        last = step_epoch(trainer, trainer.args.max_steps - 1)
        if last < self.start:
            total = step_epoch(trainer, trainer.args.max_steps)
            raise ValueError(
                f"swa_start is {self.start:g} but the run is {total:.3g} epochs long (its last step runs in epoch "
                f"{last:.3g}): nothing would be averaged; lower swa_start or train longer"
            )

    def on_train_start(self, trainer: Trainer) -> None:
        self.average = {n: p.detach().float().clone() for n, p in self._params(trainer).items()}
        self.count = 0

    def before_optimizer_step(self, trainer: Trainer) -> None:
        self._scale = trainer.scaler.get_scale() if trainer.scaler is not None else None

    def after_optimizer_step(self, trainer: Trainer) -> None:
        # trainer.step is the step just taken (it is counted after this hook)
        skipped = self._scale is not None and trainer.scaler.get_scale() < self._scale
        if step_epoch(trainer) >= self.start and not skipped:  # a skipped fp16 step would count an iterate twice
            self._add(trainer)
        if self.lr and step_epoch(trainer, trainer.step + 1) >= self.start:
            # after the scheduler's step: the next step's rate (it is in the optimizer's state, so resuming keeps it)
            for group in trainer.optimizer.param_groups:
                group["lr"] = self.lr * group["initial_lr"] / trainer.args.lr

    @torch.no_grad()
    def _add(self, trainer: Trainer) -> None:
        params = self._params(trainer)
        for name, average in self.average.items():  # one by one: TP mixes DTensors and whole tensors, which one
            self._update([average], [params[name].detach().float()], self.count)  # foreach call refuses
        self.count += 1

    def evaluation_context(self, trainer: Trainer) -> contextlib.AbstractContextManager:
        if self.count == 0:
            return contextlib.nullcontext()
        return swapped_in(self._params(trainer), self.average)

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "lr": self.lr, "count": self.count, "average": self.average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        for name, tensor in state["average"].items():
            self.average[name].copy_(tensor)


class MultiSampleDropout(Plugin):
    """Multi-sample dropout (Inoue 2019) for classification heads: while training, the head's dropout and
    classifier run ``samples`` times with independent masks and the losses are averaged (see
    :func:`bunmyaku.models.heads.multi_sample`); evaluation and the exported model are the plain head.

    Supported: heads that apply dropout before their classifier on BERT-family models (BERT, RoBERTa, MiniLM...):
    sequence classification (single-label, multi-label, regression), token classification, multiple choice.

    Args:
        samples: dropout samples per training forward (>= 2 to have an effect).
    """

    def __init__(self, samples: int):
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"multi_sample_dropout must be a whole number >= 1, got {samples!r}")
        self.samples = samples

    def on_fit_start(self, trainer: Trainer) -> None:
        model = trainer.unwrapped_model
        if not hasattr(type(model), "multi_sample_dropout"):
            raise ValueError(
                f"multi_sample_dropout needs a classification head that applies dropout before its classifier "
                f"(BERT-family sequence / token classification, multiple choice); {type(model).__name__} has none"
            )
        if not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.head.modules()):
            logger.warning(
                "multi_sample_dropout: the head's dropout is 0, so its %d samples are all alike", self.samples
            )
        model.multi_sample_dropout = self.samples  # an attribute, not a weight: the saved model is unchanged
        logger.info("Multi-sample dropout: %d dropout samples of the head per training forward", self.samples)


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


_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EMBED_NAME = re.compile(r"(?:^|\.)embed(?:dings)?\.")


def _num_layers(names: Iterator[str] | list[str]) -> int:
    found = [int(m.group(1)) for name in names if (m := _LAYER_NAME.search(name))]
    if not found:
        raise ValueError("the model has no 'layers.<i>' parameters: layer-wise options need a Transformer stack")
    return max(found) + 1


def llrd_scale(name: str, num_layers: int, decay: float) -> float:
    """The factor on the learning rate of parameter ``name`` under layer-wise decay ``decay``.

    Head, pooler and final norm: 1; layer ``i`` of ``num_layers`` (0-based): ``decay ** (num_layers - 1 - i)``, so
    the top layer trains at the full rate like the head; embeddings: ``decay ** num_layers``, one step below
    layer 0.
    """
    match = _LAYER_NAME.search(name)
    if match is not None:
        return decay ** (num_layers - 1 - int(match.group(1)))
    if _EMBED_NAME.search(name):
        return decay**num_layers
    return 1.0


class LLRD(Plugin):
    """Layer-wise learning-rate decay (Howard & Ruder 2018; Sun et al. 2019): lower layers, which hold the more
    general features, move less than the top ones while fine-tuning. See :func:`llrd_scale` for the factors.

    Each parameter group is split by factor; the groups' ``lr`` is the peak rate times the factor, and the
    schedule multiplies every group alike.

    Args:
        decay: the factor per layer, in (0, 1] (0.8 - 0.95 is usual).
    """

    def __init__(self, decay: float):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"llrd decay must be in (0, 1], got {decay}")
        self.decay = decay

    def param_groups(self, trainer: Trainer, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        names = {id(p): n for n, p in trainer.unwrapped_model.named_parameters()}
        num_layers = _num_layers(list(names.values()))
        out = []
        for group in groups:
            base_lr = group.get("lr", trainer.args.lr)
            split: dict[float, list[nn.Parameter]] = {}
            for param in group["params"]:
                split.setdefault(llrd_scale(names[id(param)], num_layers, self.decay), []).append(param)
            for scale, params in sorted(split.items(), reverse=True):
                out.append({**group, "params": params, "lr": base_lr * scale})
        logger.info(
            "Layer-wise lr decay %g over %d layers: embeddings at %.3g x lr",
            self.decay,
            num_layers,
            self.decay**num_layers,
        )
        return out


class ReinitLayers(Plugin):
    """Re-initialise the top ``layers`` Transformer layers before fine-tuning (Zhang et al. 2021, "Revisiting
    few-sample BERT fine-tuning": the top layers are specialised to pretraining's objective).

    The new weights come from the model's own initialisation (``from_config`` of its class, including GPT-2's
    scaled residual projections), drawn from the training seed.

    Args:
        layers: how many of the top layers to re-initialise (at least 1).
    """

    def __init__(self, layers: int):
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"reinit_layers must be a whole number >= 1, got {layers!r}")
        self.layers = layers

    @torch.no_grad()
    def on_fit_start(self, trainer: Trainer) -> None:
        model = trainer.unwrapped_model
        state = model.state_dict()
        num_layers = _num_layers(list(state))
        if self.layers > num_layers:
            raise ValueError(f"reinit_layers is {self.layers} but the model has only {num_layers} layers")
        if not hasattr(type(model), "from_config"):
            raise ValueError(f"reinit_layers needs a bunmyaku model with from_config, got {type(model).__name__}")
        fresh = type(model).from_config(model.config).state_dict()
        first = num_layers - self.layers
        renewed = [n for n in state if (m := _LAYER_NAME.search(n)) and int(m.group(1)) >= first]
        for name in renewed:
            state[name].copy_(fresh[name])
        logger.info("Re-initialised the top %d of %d layers (%d tensors)", self.layers, num_layers, len(renewed))
