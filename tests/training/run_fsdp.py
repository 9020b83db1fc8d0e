"""Tiny causal-LM runs with ``strategy fsdp`` / ``hsdp``, as a script: tests/training/test_fsdp.py starts it.

Usage: ``python -m tests.training.run_fsdp OUTPUT_DIR two`` under torchrun with 2 processes, then
``python -m tests.training.run_fsdp OUTPUT_DIR one`` in 1 process. Every run: 6 steps of 2 micro-batches,
gradient checkpointing on, a sharded checkpoint every 3 steps; 2 processes take micro-batches of 4, 1 process 8
(the same global batch).

``two`` writes ``fsdp/`` (uninterrupted), ``hsdp/`` (a (1, 2) mesh), ``resumed2/`` (interrupted during step 4,
after the step-3 checkpoint, then resumed by a new Trainer), ``plugins2/`` (layer-wise LR decay and frozen
embeddings), ``bf16/`` (bf16 compute, fp32 reduction), ``best2/`` (restore_best) and ``reduce_scatters.json``
(the reduce-scatter calls FSDP made in a 2-step run with accumulation). ``one`` writes ``single/``
(uninterrupted), ``plugins1/``, ``best1/`` and ``resumed1/`` (resumed from ``resumed2``'s step-3 checkpoint,
written by 2 processes). Both also train once per plugin of ``SHARDED_PLUGINS`` (EMA, SWA, FGM, AWP, SAM, ASAM:
``<name>2/``, ``<name>1/``; ``two`` also ``ema-hsdp2/`` and ``sam-hsdp2/`` with hsdp); ``two`` writes
``ema-resumed2/`` (EMA, interrupted during step 4 and resumed) and ``one`` ``ema-resumed1/`` (EMA, resumed from
``ema-resumed2``'s step-3 checkpoint). ``cuda`` (2 GPUs, NCCL) writes ``cuda/`` and ``offload/`` (``cpu_offload``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from bunmyaku.data import CausalLMCollator, PackedBlocks
from bunmyaku.training import TrainArgs, Trainer
from bunmyaku.training.distributed import process_group_from_env, world_size
from bunmyaku.training.plugins import Plugin
from tests.training.helpers import EOS, fail_if_group_outlived, random_split, tiny_gpt2
from tests.training.run_tiny import PLUGINS as PLUGIN_SETTINGS


class Interrupted(Exception):
    """Raised by :class:`Interrupt`."""


class Interrupt(Plugin):
    """Stop the run in the middle of step ``step + 1`` (after step ``step``'s checkpoint), as a crash would."""

    def __init__(self, step: int):
        self.step = step

    def after_optimizer_step(self, trainer) -> None:
        if trainer.step == self.step:
            raise Interrupted


PLUGINS = {"llrd": 0.5, "freeze_embeddings": True}
# the plugins that keep sharded averages (EMA, SWA) or perturb by norms over every shard (FGM, AWP, SAM, ASAM)
SHARDED_PLUGINS = ("ema", "swa", "fgm", "awp", "sam", "asam")
# restore_best selecting the highest loss: the step-3 evaluation's weights are kept and exported, not the last ones
WORST = {"restore_best": True, "metric": "loss", "greater_is_better": True}


def train(output_dir: Path, max_steps: int, plugins=(), selection=None, **settings) -> None:
    # max_grad_norm below the tiny runs' gradient norms (0.4-0.8), so that clipping acts on every step
    defaults = {"strategy": "fsdp", "device": "cpu", "gradient_checkpointing": True, "max_grad_norm": 0.3}
    args = TrainArgs(
        output_dir=str(output_dir),
        max_steps=max_steps,
        batch_size=8 // world_size(),
        grad_accum_steps=2,
        lr=3e-3,
        warmup_steps=2,
        eval_every=3,
        save_every=3,
        keep_last=2,
        progress=False,
        plot=False,
        **{**defaults, **settings},
    )
    train_data = PackedBlocks(random_split(60), 16, EOS, random_offset=True)
    valid = PackedBlocks(random_split(9, seed=1), 16, EOS)  # an odd count: the processes' shares differ
    Trainer(tiny_gpt2(), args, train_data, valid, CausalLMCollator(), plugins=plugins, **(selection or {})).fit()


def count_reduce_scatters(out: Path) -> None:
    """Train 2 steps of 2 micro-batches and record how many reduce-scatters FSDP issued."""
    calls = []
    original = dist.reduce_scatter_single

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.reduce_scatter_single = counting
    try:
        train(out / "count", 2, max_grad_norm=0.0)
    finally:
        dist.reduce_scatter_single = original
    if dist.get_rank() == 0:
        (out / "reduce_scatters.json").write_text(json.dumps({"calls": len(calls)}))


# AWP moving each matrix by 5% of its norm, each weight by up to 100% of itself: the clamp seldom binds, so the
# perturbation is set by the matrices' norms (with run_tiny's 1.0 and 1% the clamp alone would decide it)
AWP = {**PLUGIN_SETTINGS["awp"], "awp_lr": 0.05, "awp_eps": 1.0}


def train_plugins(out: Path, suffix: str) -> None:
    for name in SHARDED_PLUGINS:
        train(out / f"{name}{suffix}", 6, **(AWP if name == "awp" else PLUGIN_SETTINGS[name]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("mode", choices=["one", "two", "cuda"])
    cli = parser.parse_args()
    torch.set_num_threads(1)
    out = cli.output_dir
    with process_group_from_env(None if cli.mode == "cuda" else "gloo"):
        if cli.mode == "cuda":  # NCCL, one GPU per process: parameters and optimizer state on the GPU or the host
            train(out / "cuda", 6, device="cuda")
            train(out / "offload", 6, device="cuda", cpu_offload=True)
        elif cli.mode == "two":
            train(out / "fsdp", 6)
            train(out / "hsdp", 6, strategy="hsdp")
            try:
                train(out / "resumed2", 6, plugins=[Interrupt(3)])
            except Interrupted:
                pass
            train(out / "resumed2", 6)
            train(out / "plugins2", 6, **PLUGINS)
            train(out / "bf16", 6, precision="bf16")
            train(out / "best2", 6, selection=WORST)
            count_reduce_scatters(out)
            train_plugins(out, "2")
            for name in ("ema", "sam"):  # the (replicate, shard) mesh: norms and averages over a 2-D layout
                train(out / f"{name}-hsdp2", 6, strategy="hsdp", **PLUGIN_SETTINGS[name])
            try:  # the plugin lists of both runs alike: a checkpoint's plugin states are matched by position
                train(out / "ema-resumed2", 6, plugins=[Interrupt(3)], **PLUGIN_SETTINGS["ema"])
            except Interrupted:
                pass
            train(out / "ema-resumed2", 6, plugins=[Interrupt(99)], **PLUGIN_SETTINGS["ema"])
        else:
            train(out / "single", 6)
            train(out / "plugins1", 6, **PLUGINS)
            train(out / "best1", 6, selection=WORST)
            checkpoint = out / "resumed1" / "checkpoints" / "step-00000003"
            shutil.copytree(out / "resumed2" / "checkpoints" / "step-00000003", checkpoint)
            train(out / "resumed1", 6)
            train_plugins(out, "1")
            checkpoint = out / "ema-resumed1" / "checkpoints" / "step-00000003"
            shutil.copytree(out / "ema-resumed2" / "checkpoints" / "step-00000003", checkpoint)
            train(out / "ema-resumed1", 6, plugins=[Interrupt(99)], **PLUGIN_SETTINGS["ema"])


if __name__ == "__main__":
    main()
    fail_if_group_outlived()
