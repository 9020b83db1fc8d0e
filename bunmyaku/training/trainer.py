"""The Trainer: one loop for pretraining and every later capability (fine-tuning, adversarial training, EMA...).

Read :meth:`Trainer.fit` first; each named step below it does one thing:

- ``_train_step``: count the step's targets over all micro-batches and processes, then forward / backward each
  micro-batch with loss = sum / global count (so accumulation gives the full-batch gradient), skipping DDP's
  gradient sync (FSDP's reduce-scatter) on all but the last micro-batch;
- ``_optimizer_step``: unscale (fp16), clip, step the optimizer, scheduler and scaler;
- ``_evaluate``: the evaluation callable (by default held-out loss, perplexity and token accuracy), then the
  selection: the best evaluation by ``metric`` is remembered (its weights too with ``restore_best``), and
  ``patience`` evaluations without improvement stop the run early;
- ``_save``: an atomic checkpoint with everything exact resume needs (the batch plan's position included).

Training input is either a map-style dataset with a collator (drawn through a :class:`BatchStream`) or a
*batch plan*: any object with ``next_batch()`` returning a ready batch, ``batches_per_epoch``, and
``state_dict()`` / ``load_state_dict()`` for its position (fine-tuning's length-grouped batches are one).

A run that diverges stops: the first step whose loss is not finite is recorded on the device (no host sync per
step) and raised as :class:`TrainingDiverged` at the next log, evaluation, checkpoint or export, so NaN weights
are never saved, exported or resumed from.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bunmyaku.data.loader import BatchStream, eval_batches
from bunmyaku.models.quantize import frozen_prefixes
from bunmyaku.training import checkpoint as ckpt
from bunmyaku.training import distributed as dist_utils
from bunmyaku.training import sharding
from bunmyaku.training.adversarial import adversarial_plugins
from bunmyaku.training.args import TrainArgs
from bunmyaku.training.metrics import MetricsWriter, plot_losses
from bunmyaku.training.objectives import objective_for
from bunmyaku.training.optim import build_optimizer, build_scheduler
from bunmyaku.training.plugins import EMA, LLRD, SWA, Freeze, Plugin, ReinitLayers

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
# metrics where a smaller value is better (an error or a loss); every other selection metric is a score
LOWER_IS_BETTER = ("loss", "perplexity", "mse", "mae", "rmse")


class _Default:
    """Marks an argument left at its default (where None means something else)."""


def _is_batch_plan(data: Any) -> bool:
    """Whether ``data`` hands out ready batches itself (``next_batch``) rather than examples to collate."""
    return callable(getattr(data, "next_batch", None))


class TrainingDiverged(ValueError):
    """The loss or the weights stopped being finite (a learning rate too high, bad labels, fp16 overflow)."""


class Trainer:
    """Trains ``model`` on ``train_data`` with the settings in ``args``.

    Args:
        model: a bunmyaku model (or any module whose forward takes the batch's tensors by keyword).
        args: the settings.
        train_data: a map-style dataset of examples (``PackedBlocks``, ``SegmentPairs``, ...), or a batch plan
            (``next_batch()``, ``batches_per_epoch``, ``state_dict()``, ``load_state_dict()``) of ready batches.
        eval_data: the held-out examples, or None.
        collator: ``collator(examples, epoch=, indices=)`` -> batch of tensors (needed for a dataset and for the
            default evaluation).
        objective: ``objective(model, batch)`` -> (loss sums, metric sums), with ``count(batch)``; default: from the
            model's task (causal-lm, masked-lm, pretraining).
        plugins: hooks that change the step (see :mod:`bunmyaku.training.plugins`); ``args.ema_decay``,
            ``args.swa_start`` and the freezing flags add EMA, SWA and Freeze plugins.
        tokenizer: saved with the final model when given.
        evaluate: ``evaluate(trainer) -> {name: value}`` (plain names, None for an undefined value), run in eval
            mode under the plugins' evaluation contexts; default: loss, perplexity and accuracy on ``eval_data``.
        metric: the evaluation's value that selects the best evaluation.
        greater_is_better: the direction of ``metric`` (default: lower for :data:`LOWER_IS_BETTER`, else higher).
        patience: stop after this many evaluations without improvement of ``metric`` (0: never stop early).
        restore_best: keep the best evaluation's weights (in memory and in checkpoints) and load them at the end.
        export_dir: where the final model (and tokenizer) is saved (default: ``args.output_dir``; None: not saved).
        checkpoint_at_end: write a checkpoint at the last step besides every ``args.save_every`` steps.
        title: the loss plot's title.
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainArgs,
        train_data: Any,
        eval_data: Any = None,
        collator: Callable[..., Batch] | None = None,
        objective: Any = None,
        plugins: Sequence[Plugin] = (),
        tokenizer: Any = None,
        *,
        evaluate: Callable[[Trainer], Mapping[str, float | None]] | None = None,
        metric: str = "loss",
        greater_is_better: bool | None = None,
        patience: int = 0,
        restore_best: bool = False,
        export_dir: str | Path | None | type[_Default] = _Default,
        checkpoint_at_end: bool = True,
        title: str | None = None,
    ):
        if collator is None and not _is_batch_plan(train_data):
            raise ValueError("a collator is required to turn examples into batches")
        self.args = args
        self.unwrapped_model = model
        self.model: nn.Module = model
        self.train_data, self.eval_data, self.collator = train_data, eval_data, collator
        self.objective = objective if objective is not None else objective_for(model)
        self.tokenizer = tokenizer
        self.plugins = list(plugins)
        if args.freeze_embeddings or args.freeze_layers:
            self.plugins.append(Freeze(args.freeze_embeddings, args.freeze_layers))
        if args.ema_decay:
            self.plugins.append(EMA(args.ema_decay))
        if args.swa_start:
            self.plugins.append(SWA(args.swa_start, args.swa_lr))
        if args.reinit_layers:  # first: EMA and the others must see the new weights
            self.plugins.insert(0, ReinitLayers(args.reinit_layers))
        if args.llrd:
            self.plugins.append(LLRD(args.llrd))
        self.plugins.extend(adversarial_plugins(args))
        self.output_dir = Path(args.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        if export_dir is _Default:
            export_dir = self.output_dir
        self.export_dir = None if export_dir is None else Path(export_dir)
        self.checkpoint_at_end = checkpoint_at_end
        self.title = title
        self.evaluator = evaluate if evaluate is not None else Trainer._loss_evaluation
        self.metric = metric
        if greater_is_better is None:
            greater_is_better = metric not in LOWER_IS_BETTER
        self.greater_is_better = greater_is_better
        self.patience = patience
        self.restore_best = restore_best
        self.step = 0
        self.best: dict[str, Any] = {"eval_loss": math.inf, "step": None}  # the saved checkpoint with the lowest loss
        # the best evaluation by ``metric``: {"step", "eval_<name>": value, ...}; {} before the first evaluation
        self.selected: dict[str, Any] = {}
        self.selected_state: dict[str, torch.Tensor] | None = None
        self.evaluations: list[dict[str, Any]] = []  # every evaluation's values, plain names, with its step
        self.bad_evals = 0
        self.stopped_early = False
        self.rank, self.world_size = dist_utils.rank(), dist_utils.world_size()
        self.is_main = self.rank == 0
        # the data-parallel coordinates: every process of a tensor-parallel group (--tp) reads the same batches
        self.data_rank, self.data_world = sharding.data_coordinates(self.rank, self.world_size, args.tp)
        self.device = _pick_device(args.device)
        self._step_batches: list[Batch] = []
        self._step_counts: dict[str, float] = {}
        self._last_eval: tuple[int, float] = (-1, math.inf)
        self._last_metrics: dict[str, float] = {}
        self._eval_seconds = 0.0

    # ------------------------------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, float]:
        """Train to ``args.max_steps`` (resuming when a checkpoint exists), export the model, return the last
        evaluation's metrics ({} without held-out data)."""
        self._setup()
        with self._progress() as progress:
            while self.step < self.args.max_steps and not self.stopped_early:
                stats = self._train_step([self.train_stream.next_batch() for _ in range(self.args.grad_accum_steps)])
                self._optimizer_step()
                self.step += 1
                self._log_train(stats, progress)
                if self._due(self.args.eval_every):
                    self._evaluate()
                if self._due_checkpoint():
                    self._save()
        return self._finish()

    # ------------------------------------------------------------------------------------------ the steps

    def _train_step(self, micro_batches: list[Batch]) -> dict[str, float | torch.Tensor]:
        """Forward and backward every micro-batch of one optimizer step; returns the step's summed statistics.

        Target counts and tokens are read from the host batches, and on one process the loss sums stay on the
        device until a logging step reads them: no step waits for the GPU (several host syncs per step would
        leave it idle while the next batch is prepared and launched).
        """
        self.model.train()
        local_counts: dict[str, float] = {}
        for batch in micro_batches:  # host tensors: counting them needs no device round trip
            for term, n in self.objective.count(batch).items():
                local_counts[term] = local_counts.get(term, 0) + n
        tokens = sum(_num_tokens(b) for b in micro_batches)
        if self.args.tp > 1:  # the processes of a tensor-parallel group read the same batches: count them once
            tokens /= self.args.tp
        self._step_batches = [self._to_device(b) for b in micro_batches]
        self._step_counts = dist_utils.all_reduce_sums(local_counts, self.device)
        sums: dict[str, float | torch.Tensor] = {**self.forward_backward(), "tokens": tokens}
        if self.world_size > 1:
            sums = dist_utils.all_reduce_sums(sums, self.device)
        self._watch_loss(sum(sums[t] for t in self._step_counts if t in sums))
        return {**sums, **{f"count_{k}": v for k, v in self._step_counts.items()}}

    def forward_backward(self) -> dict[str, torch.Tensor]:
        """Accumulate the gradient of the current step's micro-batches (plugins such as SAM call it again).

        Returns the summed loss and metric terms as float64 device tensors."""
        sums: dict[str, torch.Tensor] = {}
        last = len(self._step_batches) - 1
        for i, batch in enumerate(self._step_batches):
            with self._gradient_sync(i == last):
                with self.autocast():
                    losses, metrics = self.objective(self.model, batch)
                # DDP and FSDP average gradients over processes; the global count already covers all of them
                loss = sum(losses[t] / max(self._step_counts[t], 1) for t in losses) * self.world_size
                for plugin in self.plugins:
                    plugin.before_backward(self, loss)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                for plugin in self.plugins:
                    plugin.after_backward(self)
            for key, value in {**losses, **metrics}.items():
                value = value.detach().to(torch.float64)
                sums[key] = sums[key] + value if key in sums else value
        return sums

    def _optimizer_step(self) -> None:
        """Unscale, clip, step; then clear gradients."""
        for plugin in self.plugins:
            plugin.before_optimizer_step(self)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.args.max_grad_norm > 0:
            # a device tensor: read (one sync) only when a step is logged; over sharded gradients (DTensors) the
            # norm is already reduced over every shard and replicated
            if self.args.tp > 1:  # whole and split weights side by side
                norm = sharding.clip_grad_norm(self.trainable, self.args.max_grad_norm)
            else:
                norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.args.max_grad_norm)
            self.grad_norm = sharding.local_tensor(norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for plugin in self.plugins:
            plugin.after_optimizer_step(self)

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        """Run the evaluation callable in eval mode (under the plugins' evaluation contexts), log its values as
        ``eval_<name>``, and update the selection: the best evaluation, its weights with ``restore_best``, early
        stopping after ``patience`` evaluations without improvement."""
        if self.evaluator is Trainer._loss_evaluation and self.eval_data is None:
            return {}
        self._raise_if_diverged()
        started = time.perf_counter()
        model = self.unwrapped_model
        model.eval()
        with contextlib.ExitStack() as stack:
            for plugin in self.plugins:
                stack.enter_context(plugin.evaluation_context(self))
            if sharding.is_sharded(model):  # evaluation forwards without collectives: shares may differ in size
                stack.enter_context(sharding.gathered(model))
            values = dict(self.evaluator(self))
            improved = self._select(values)
            if improved and self.restore_best:  # inside the contexts: the weights that were evaluated (EMA's)
                self.selected_state = self._cpu_state()
        model.train()
        metrics = {f"eval_{k}": v for k, v in values.items() if v is not None}
        for plugin in self.plugins:
            plugin.on_evaluate(self, metrics)
        self._last_eval = (self.step, metrics.get("eval_loss", math.inf))
        self._last_metrics = metrics
        if self.is_main:
            self.writer.write({"step": self.step, **metrics})
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float | int))
            logger.info("step %d: %s", self.step, shown)
        if self.patience and self.bad_evals >= self.patience and self.step < self.args.max_steps:
            logger.info(
                "Early stopping at step %d: no better %s in %d evaluations", self.step, self.metric, self.bad_evals
            )
            self.stopped_early = True
        self._eval_seconds += time.perf_counter() - started
        return metrics

    def _select(self, values: dict[str, Any]) -> bool:
        """Record an evaluation; returns whether it is the best so far by ``metric``. An undefined value (None) is
        no improvement; a value that is not finite stops the run."""
        broken = sorted(k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v))
        if broken:
            raise TrainingDiverged(
                f"the evaluation's {', '.join(broken)} at step {self.step}: not finite (the model's outputs are broken)"
            )
        if self.metric not in values:
            raise ValueError(f"metric {self.metric!r} is not computed by the evaluation; available: {sorted(values)}")
        self.evaluations.append({"step": self.step, **values})
        value = values[self.metric]
        best = self.selected.get(f"eval_{self.metric}")
        better = value is not None and (best is None or (value > best if self.greater_is_better else value < best))
        if better or not self.selected:
            self.selected = {"step": self.step, **{f"eval_{k}": v for k, v in values.items()}}
            self.bad_evals = 0
            return True
        self.bad_evals += 1
        return False

    def _loss_evaluation(self) -> dict[str, float]:
        """Loss, perplexity and token accuracy on the held-out data (all of it, or ``args.eval_batches``)."""
        sums: dict[str, float] = {}
        batches = eval_batches(self.eval_data, self.collator, self.args.batch_size, self.data_rank, self.data_world)
        limit = self.args.eval_batches if self.step < self.args.max_steps else 0  # the last one sees it all
        for i, batch in enumerate(batches):
            if limit and i == limit:
                break
            batch = self._to_device(batch)
            with self.autocast():
                losses, metrics = self.objective(self.unwrapped_model, batch)
            for key, value in {**losses, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            for term, n in self.objective.count(batch).items():
                sums[f"count_{term}"] = sums.get(f"count_{term}", 0.0) + n
        totals = dist_utils.all_reduce_sums(sums, self.device)
        return _summarise(totals)

    def _save(self) -> None:
        """Checkpoint model, optimizer, scheduler, scaler, plugins, RNG states (every process) and data position."""
        self._raise_if_diverged()
        self._check_weights("checkpoint")
        eval_step, eval_loss = self._last_eval
        if eval_step == self.step and eval_loss < self.best["eval_loss"]:
            self.best = {"eval_loss": eval_loss, "step": self.step}
        rng_states = dist_utils.gather_objects(ckpt.rng_state())
        if self.sharded_checkpoints:
            self._save_sharded(rng_states)
            return
        if self.is_main:
            state = {**self._trainer_state(rng_states), "optimizer": self.optimizer.state_dict()}
            ckpt.save_checkpoint(self.checkpoint_dir, self.step, self.unwrapped_model, state)
            self._rotate()
        dist_utils.barrier()

    def _trainer_state(self, rng_states: list[Any]) -> dict[str, Any]:
        """Everything a checkpoint holds besides the model and optimizer."""
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "plugins": [p.state_dict() for p in self.plugins],
            "rng": rng_states,
            "data": self.train_stream.state_dict(),
            "best": self.best,
            "selection": {"selected": self.selected, "evaluations": self.evaluations, "bad_evals": self.bad_evals},
            "selected_state": self.selected_state,
            "last_metrics": self._last_metrics,
            "world_size": self.world_size,
        }

    def _save_sharded(self, rng_states: list[Any]) -> None:
        """fsdp / hsdp: every process writes its shards of the model and optimizer state (DCP), rank 0 the rest."""
        # every process: the plugins' tensors (EMA's sharded average) go through DCP, their stubs into rank 0's JSON
        plugin_states, plugin_tensors = sharding.split_plugin_states([p.state_dict() for p in self.plugins])
        state = {**self._trainer_state(rng_states), "plugins": plugin_states} if self.is_main else {}
        sharding.save_checkpoint(self.checkpoint_dir, self.step, self.model, self.optimizer, state, plugin_tensors)
        if self.is_main:
            self._rotate()
        dist_utils.barrier()

    def _rotate(self) -> None:
        best = {ckpt.step_dir(self.checkpoint_dir, self.best["step"])} if self.best["step"] is not None else set()
        ckpt.rotate_checkpoints(self.checkpoint_dir, self.args.keep_last, best)

    # ------------------------------------------------------------------------------------------ set-up

    def _setup(self) -> None:
        args = self.args
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        torch.manual_seed(args.seed + self.data_rank)  # one dropout stream per tensor-parallel group
        model = self.unwrapped_model.to(self.device)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if args.compile:
            model.compile()  # nn.Module.compile: the module and its state-dict keys stay as they are
            if hasattr(self.objective, "compile"):
                self.objective.compile()  # the loss over the logits, outside the model's forward
        if _is_batch_plan(self.train_data):  # before the plugins: those acting from an epoch on read its length
            self.train_stream = self.train_data
        else:
            self.train_stream = BatchStream(
                self.train_data, self.collator, args.batch_size, True, args.seed, self.data_rank, self.data_world
            )
        for plugin in self.plugins:
            plugin.on_fit_start(self)
        sharding.check_strategy(args, self.plugins, self.device)
        # fsdp / hsdp checkpoints are sharded (DCP) on any number of processes, so that 1 process resumes 2's
        self.sharded_checkpoints = args.strategy != "ddp" or args.tp > 1
        if args.tp > 1:
            self._parallelize(model)
        elif self.world_size > 1 and args.strategy == "ddp":
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # DDP's search for parameters without a gradient walks the autograd graph after every forward: only for
            # models that say a forward may leave some unused (else DDP waits for their gradients and fails)
            unused = maybe_unused_parameters(model)
            if unused:
                logger.info("DDP seeks unused parameters each step: %d may be unused (%s ...)", len(unused), unused[0])
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=device_ids, find_unused_parameters=bool(unused)
            )
        elif self.world_size > 1:  # in place: parameters become DTensors, names and the module stay
            mesh = sharding.build_mesh(args.strategy, self.device, args.shard_size)
            sharding.shard_model(model, mesh, bf16=args.precision == "bf16", cpu_offload=args.cpu_offload)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        groups = _param_groups(model, args.weight_decay)
        for plugin in self.plugins:
            groups = plugin.param_groups(self, groups)
        # offloaded parameters live on the host: so does their optimizer state (no fused CUDA kernel)
        self.optimizer = build_optimizer(groups, args, torch.device("cpu") if args.cpu_offload else self.device)
        self.scheduler = build_scheduler(self.optimizer, args)
        self.scaler = torch.amp.GradScaler(self.device.type) if args.precision == "fp16" else None
        self.grad_norm: float | torch.Tensor | None = None
        self._first_bad_step = torch.tensor(-1, device=self.device)
        for plugin in self.plugins:  # per-parameter state (EMA's average) shaped like the parameters: sharded or whole
            plugin.on_train_start(self)
        if args.tp > 1:  # before resuming (loading optimizer state takes a step) and after (the groups are loaded)
            sharding.unfuse_optimizer(self.optimizer)
        resumed = self._resume() if args.resume else None
        if args.tp > 1:
            sharding.unfuse_optimizer(self.optimizer)
        if self.is_main:
            self.writer = MetricsWriter(self.output_dir, resume_step=resumed)
        self._started = time.perf_counter()
        self._tokens_seen = 0.0

    def _parallelize(self, model: nn.Module) -> None:
        """--tp: split the blocks over tensor-parallel groups, then (strategy fsdp) shard the data-parallel
        replicas over the other dimension of the 2-D mesh."""
        args = self.args
        sharding.check_tensor_parallel(model, args.tp, self.world_size, args.strategy)
        sharding.check_tensor_parallel_settings(args, self.plugins)
        mesh = sharding.build_tp_mesh(self.device, args.tp)
        sharding.parallelize(model, mesh["tp"])
        if args.strategy == "fsdp" and self.data_world > 1:
            sharding.shard_model(model, mesh["dp"], bf16=args.precision == "bf16", cpu_offload=args.cpu_offload)

    def _resume(self) -> int | None:
        """Load the newest intact checkpoint, if any (a damaged newer one is skipped); returns its step."""
        if self.sharded_checkpoints:
            found_sharded = sharding.latest_readable(self.checkpoint_dir)
            if found_sharded is None:
                return None
            path, state = found_sharded
            sharding.load_checkpoint(path, self.model, self.optimizer, state, self.plugins)
        else:
            newest = ckpt.list_checkpoints(self.checkpoint_dir)[-1:]
            if newest and (newest[0][1] / sharding.SHARDS).is_dir():
                raise ValueError(
                    f"{newest[0][1]} is a sharded checkpoint (strategy fsdp / hsdp): resume it with that strategy, "
                    "or start afresh in another output folder"
                )
            found = ckpt.latest_readable(self.unwrapped_model, self.checkpoint_dir)
            if found is None:
                return None
            path, state = found.path, found.state
            ckpt.load_weights(self.unwrapped_model, found.weights, found.path)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        for plugin, plugin_state in zip(self.plugins, state["plugins"], strict=False):
            plugin.load_state_dict(plugin_state)
        self.train_stream.load_state_dict(state["data"])
        rng = state["rng"]
        if state["world_size"] != self.world_size:
            logger.warning("resuming %d processes from a %d-process run: RNG streams differ", self.world_size, len(rng))
        ckpt.set_rng_state(rng[self.rank % len(rng)])
        self.step, self.best, self._last_metrics = state["step"], state["best"], state["last_metrics"]
        selection = state.get("selection") or {}
        self.selected = selection.get("selected", {})
        self.evaluations = selection.get("evaluations", [])
        self.bad_evals = selection.get("bad_evals", 0)
        self.selected_state = state.get("selected_state")
        logger.info("Resumed from %s (step %d)", path, self.step)
        return self.step

    def _restore(self, path: Path) -> None:
        """Load a checkpoint's weights and plugin states (EMA's or SWA's average) for export."""
        found = ckpt.read_checkpoint(self.unwrapped_model, path)
        ckpt.load_weights(self.unwrapped_model, found.weights, path)
        for plugin, plugin_state in zip(self.plugins, found.state["plugins"], strict=False):
            plugin.load_state_dict(plugin_state)
        logger.info("Exporting the best checkpoint, %s (eval loss %.4f)", path, self.best["eval_loss"])

    def _finish(self) -> dict[str, float]:
        """Load the best evaluation's weights (``restore_best``); export the model (EMA's or SWA's average when on)
        and the tokenizer to ``export_dir``; plot the losses; return the last evaluation's metrics."""
        args = self.args
        self._raise_if_diverged()
        if self.restore_best and self.selected_state is not None:
            if sharding.is_sharded(self.model):
                sharding.load_full_state_dict(self.model, self.selected_state)
            else:  # a quantized base's tensors are left out of the snapshot: they never change (_cpu_state)
                missing, unexpected = self.unwrapped_model.load_state_dict(self.selected_state, strict=False)
                frozen = frozen_prefixes(self.unwrapped_model)
                if unexpected or not all(key.startswith(frozen) for key in missing):
                    raise RuntimeError(f"the best evaluation's weights do not fit the model: {missing} {unexpected}")
            logger.info("Restored the best evaluation (step %d, %s)", self.selected["step"], self._selected_value())
        if self.sharded_checkpoints:
            self._finish_sharded()
        elif self.is_main:
            if args.export_best and self.best["step"] not in (None, self.step):
                self._restore(ckpt.step_dir(self.checkpoint_dir, self.best["step"]))
            if self.export_dir is not None:
                with contextlib.ExitStack() as stack:
                    if not (self.restore_best and self.selected_state is not None):  # those were evaluated as is
                        for plugin in self.plugins:
                            stack.enter_context(plugin.evaluation_context(self))
                    self._check_weights("export")
                    ckpt.save_model(self.unwrapped_model, self.export_dir, dtype=args.export_dtype)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(self.export_dir)
                logger.info("Saved the model to %s", self.export_dir)
        if self.is_main:
            self.writer.close()
            if args.plot:
                metric = None if self.metric == "loss" else self.metric
                plot_losses(self.writer.path, self.output_dir / "loss_curves.png", title=self.title, metric=metric)
        dist_utils.barrier()
        return dict(self._last_metrics)

    def _finish_sharded(self) -> None:
        """fsdp / hsdp: the best checkpoint's weights (``export_best``) are read by every process, and the
        export gathers the whole weights to rank 0, which writes one ordinary HF folder."""
        model = self.model
        if self.args.export_best and self.best["step"] not in (None, self.step):
            path = ckpt.step_dir(self.checkpoint_dir, self.best["step"])
            state = sharding.read_checkpoint(path)
            sharding.load_checkpoint(path, model, None, state, self.plugins)
            for plugin, plugin_state in zip(self.plugins, state["plugins"], strict=False):
                plugin.load_state_dict(plugin_state)  # EMA's or SWA's average of that checkpoint, for the export
            logger.info("Exporting the best checkpoint, %s (eval loss %.4f)", path, self.best["eval_loss"])
        if self.export_dir is None:
            return
        with contextlib.ExitStack() as stack:  # EMA's or SWA's average swapped in, shard by shard, then gathered
            if not (self.restore_best and self.selected_state is not None):  # those were evaluated as is
                for plugin in self.plugins:
                    stack.enter_context(plugin.evaluation_context(self))
            self._check_weights("export")
            if sharding.is_sharded(model):
                sharding.export(model, self.export_dir, dtype=self.args.export_dtype)
            elif self.is_main:
                ckpt.save_model(model, self.export_dir, dtype=self.args.export_dtype)
        if self.is_main:
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(self.export_dir)
            logger.info("Saved the model to %s", self.export_dir)

    def _cpu_state(self) -> dict[str, torch.Tensor]:
        """The model's weights, whole, on the CPU (sharded: gathered on rank 0; every process must call it)."""
        if sharding.is_sharded(self.model):
            return sharding.full_state_dict(self.model)
        frozen = frozen_prefixes(self.unwrapped_model)  # QLoRA's quantized base: frozen integer codes
        state = self.unwrapped_model.state_dict()
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items() if not k.startswith(frozen)}

    @contextlib.contextmanager
    def _gradient_sync(self, enabled: bool):
        """Whether the next backward reduces gradients over processes (off for non-final micro-batches)."""
        if self.world_size == 1 or enabled:
            yield
        elif sharding.is_sharded(self.model):
            sharding.set_gradient_sync(self.model, False)
            try:
                yield
            finally:
                sharding.set_gradient_sync(self.model, True)
        else:
            with self.model.no_sync():
                yield

    def _selected_value(self) -> str:
        value = self.selected.get(f"eval_{self.metric}")
        return f"{self.metric} {'undefined' if value is None else f'{value:.4f}'}"

    @property
    def history(self) -> list[dict[str, Any]]:
        """The records written to ``metrics.jsonl`` (training logs and evaluations), in order (rank 0)."""
        return list(self.writer.records) if self.is_main else []

    # ------------------------------------------------------------------------------------------ divergence

    def _watch_loss(self, loss: float | torch.Tensor) -> None:
        """Remember the first step whose loss is not finite, on the loss's device (no host sync)."""
        loss = torch.as_tensor(loss, device=self.device)
        first = self._first_bad_step
        self._first_bad_step = torch.where(~torch.isfinite(loss) & (first < 0), self.step + 1, first)

    def _raise_if_diverged(self) -> None:
        """Raise :class:`TrainingDiverged` if a step's loss was not finite (reads the device once)."""
        step = int(self._first_bad_step)
        if step >= 0:
            raise TrainingDiverged(
                f"the training loss became non-finite (NaN or infinity) at step {step}; nothing from that step on "
                "was saved. Lower the learning rate, check the data (labels), or train in fp32 / bf16"
            )

    def _check_weights(self, purpose: str) -> None:
        """Raise :class:`TrainingDiverged` before writing a ``purpose`` (checkpoint, export) of non-finite weights."""
        # each process checks its own shards; a non-finite loss (all-reduced) stops every process together
        params = self.unwrapped_model.named_parameters()
        bad = ckpt.non_finite({n: sharding.local_tensor(p.detach()) for n, p in params})
        if bad:
            raise TrainingDiverged(
                f"the weights are not finite at step {self.step} ({', '.join(bad[:5])}); no {purpose} was written"
            )

    # ------------------------------------------------------------------------------------------ helpers

    def _due(self, every: int) -> bool:
        return self.step == self.args.max_steps or (every > 0 and self.step % every == 0)

    def _due_checkpoint(self) -> bool:
        every = self.args.save_every
        if self.checkpoint_at_end:
            return self._due(every) or self.stopped_early
        return every > 0 and self.step % every == 0

    def _to_device(self, batch: Batch) -> Batch:
        """Host batch -> device; through pinned memory on CUDA (a copy from pageable memory waits for the GPU)."""
        pin = self.device.type == "cuda"
        return {
            k: (v.pin_memory() if pin else v).to(self.device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()
        }

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's precision context (bf16 / fp16 autocast, or nothing for fp32), for evaluation callables too."""
        if self.args.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.args.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _progress(self) -> contextlib.AbstractContextManager:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s"),
            TimeRemainingColumn(),
            disable=not (self.is_main and self.args.progress),
        )
        self._task = progress.add_task("train", total=self.args.max_steps, completed=self.step, loss=0.0, tps=0.0)
        return progress

    def _log_train(self, stats: dict[str, float | torch.Tensor], progress: Any) -> None:
        self._tokens_seen += stats["tokens"]
        logged = self.step % self.args.log_every == 0 or self.step in (1, self.args.max_steps)
        if logged:
            self._raise_if_diverged()  # every process, so that all of them stop together
        if not self.is_main:
            return
        if not logged:
            elapsed = time.perf_counter() - self._started - self._eval_seconds
            progress.update(self._task, completed=self.step, tps=self._tokens_seen / max(elapsed, 1e-9))
            return
        metrics = _summarise(_host_floats(stats))  # waits for the device: the step's work is done after this
        elapsed = time.perf_counter() - self._started - self._eval_seconds
        tokens_per_s = self._tokens_seen / max(elapsed, 1e-9)
        progress.update(self._task, completed=self.step, loss=metrics.get("loss", 0.0), tps=tokens_per_s)
        record = {
            "step": self.step,
            **metrics,
            "lr": self.optimizer.param_groups[0]["lr"],  # the scheduler's, or a plugin's (SWA's constant rate)
            "grad_norm": float(self.grad_norm) if self.grad_norm is not None else None,
            "tokens_per_s": tokens_per_s,
            "elapsed_s": elapsed,
        }
        self.writer.write(record)
        logger.info(
            "step %d/%d: loss %.4f, lr %.2e, %.0f tok/s",
            self.step,
            self.args.max_steps,
            record.get("loss", math.nan),
            record["lr"],
            tokens_per_s,
        )


def _pick_device(device: str | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def _host_floats(values: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Plain floats, with one device-to-host copy for all the tensors among the values."""
    keys = [k for k, v in values.items() if torch.is_tensor(v)]
    copied = torch.stack([values[k].reshape(()).double() for k in keys]).tolist() if keys else []
    host = {k: float(v) for k, v in values.items() if not torch.is_tensor(v)}
    return {**host, **dict(zip(keys, copied, strict=True))}


def maybe_unused_parameters(model: nn.Module) -> list[str]:
    """The trainable parameters a forward of ``model`` may leave without a gradient, by name.

    A model lists them in a ``parameters_maybe_unused()`` method (Longformer's global projections, which a batch
    without global tokens never uses; a checkpoint's pooler that no head reads); without one, every parameter is
    taken to be used. Frozen parameters are left out: DDP waits for none of them anyway.
    """
    listed = getattr(model, "parameters_maybe_unused", None)
    if listed is None:
        return []
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    return [name for name in listed() if name in trainable]


def _num_tokens(batch: Batch) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear and embedding weights); none on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _summarise(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Turn summed losses and counts into ``loss`` (all terms), ``<term>_loss``, ``perplexity``, ``accuracy``."""
    out: dict[str, float] = {}
    terms = [k.removeprefix("count_") for k in sums if k.startswith("count_")]
    total = 0.0
    for term in terms:
        count = max(sums[f"count_{term}"], 1.0)
        if term not in sums:
            continue
        term_loss = sums[term] / count
        total += term_loss
        if len(terms) > 1:
            out[f"{prefix}{term}_loss"] = term_loss
        if f"{term}_correct" in sums:
            name = "accuracy" if term == "lm" else f"{term}_accuracy"
            out[f"{prefix}{name}"] = sums[f"{term}_correct"] / count
    out[f"{prefix}loss"] = total
    for key in sums:  # ratios an objective reports as summed numerators and denominators (precision, recall...)
        name = key.removesuffix("_num")
        if name != key and sums.get(f"{name}_den", 0.0) > 0:
            out[f"{prefix}{name}"] = sums[key] / sums[f"{name}_den"]
    if "lm" in terms and "lm" in sums:
        out[f"{prefix}perplexity"] = math.exp(min(sums["lm"] / max(sums["count_lm"], 1.0), 50.0))
    return out
