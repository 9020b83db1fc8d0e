"""The memory ladder on the CPU: each way of making training fit, run as a real training run, measured per rank.

    python -m bench.ladder                 # the table for BENCHMARKS.md (rungs one after the other)
    python -m bench.ladder --steps 3 --warmup 1 --only baseline,fsdp-2

The talk's ladder (gradient accumulation, gradient checkpointing, freezing lower layers, LoRA, sharding the model
over processes, tensor parallelism, offloading to the host) on one randomly initialised Llama-shaped causal LM.
Each rung changes one thing from the baseline, with the same global batch and sequence length (accumulation: the
same tokens per optimizer step in smaller micro-batches; FSDP on 2 processes: half the batch on each), so each
row reads as "what this one technique costs or saves". A rung is the Trainer's own loop (``Trainer.fit``: the
objective, accumulation without gradient sync, clipping, fused AdamW, the Freeze plugin, FSDP2 / tensor parallel
under ``torchrun`` with gloo) in a fresh process (or two), with one plugin that only watches (:class:`Watch`):

- tokens/s: the global tokens of the timed steps over their wall time, after the warm-up steps;
- memory: one further step (its forward, backward and optimizer step) under PyTorch's ``MemTracker``, the tracker
  bench/memory_plan.py checks the planner with (:func:`bench.memory_plan.tracker`): the peak bytes of live tensors
  on each rank, and the bytes of that rank's parameters, gradients and optimizer state (a sharded tensor counts
  its local shard); besides, the process's peak resident set (interpreter, libraries and allocator slack included).

The planner's prediction (``bunmyaku memory``, :func:`bunmyaku.training.memory.plan_memory`) for the same settings
stands next to each measurement. Rungs that cannot run on the CPU (offloading to the host) say so in the table
instead of a number.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import at_least
from bench.machine import describe
from bench.memory_plan import Setting, llama_config, parameter_bytes, predict, tracker
from bunmyaku.hub.files import write_json_atomic, write_text_atomic
from bunmyaku.training.memory import DEFAULT_LORA_TARGETS
from bunmyaku.training.plugins import Plugin

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MB = 2**20
EOS = 2

# 8 layers of width 512 (8 query heads, 4 key/value heads, SwiGLU 1376) over a 8,192-token vocabulary, 27M
# parameters: small enough for a few steps of every rung at 1 thread per process, large enough that parameters,
# gradients and AdamW state (16 bytes a parameter) and the activations of a batch of 8 x 256 tokens are of the same
# order, so every rung has something to save; the heads and the MLP's width split in two for tensor parallelism.
MODEL = {**llama_config(512, 8, 8, 4, vocab=8192), "intermediate_size": 1376}


@dataclass
class Rung:
    """One rung: the processes, the micro-batch per process, and the one technique that differs from the baseline."""

    name: str
    label: str
    processes: int = 1
    micro_batch: int = 8
    accum: int = 1
    checkpointing: bool = False
    freeze_layers: int = 0
    lora_r: int = 0
    lora_targets: str = ""
    lora_quantize: str | None = None
    strategy: str = "ddp"
    tp: int = 1
    cpu_offload: bool = False


def ladder(global_batch: int, model: dict[str, Any]) -> list[Rung]:
    """The rungs for ``global_batch`` sequences per optimizer step (a multiple of 4) and ``model`` (a config.json dict).

    Raises:
        ValueError: a batch accumulation cannot split, a model the planner does not know.
    """
    from bunmyaku.models.auto import model_class

    if model.get("model_type") not in DEFAULT_LORA_TARGETS:
        raise ValueError(f"model_type {model.get('model_type')!r}: expected one of {list(DEFAULT_LORA_TARGETS)}")
    num_layers = model_class(model["model_type"], "causal-lm").configure(model).num_layers
    targets = DEFAULT_LORA_TARGETS[model["model_type"]]
    if global_batch % 4:
        raise ValueError(f"--batch {global_batch}: must be a multiple of 4 (accumulation takes 4 micro-batches)")
    g = global_batch
    return [
        Rung("baseline", "baseline (1 process; = FSDP on 1 rank, which the Trainer does not shard)", micro_batch=g),
        Rung("accumulation", "gradient accumulation (4 micro-batches)", micro_batch=g // 4, accum=4),
        Rung("checkpointing", "gradient checkpointing", micro_batch=g, checkpointing=True),
        Rung(
            "freezing",
            f"freeze the lower {num_layers // 2} of {num_layers} layers",
            micro_batch=g,
            freeze_layers=num_layers // 2,
        ),
        Rung("lora", f"LoRA r=8 on {targets} (base frozen)", micro_batch=g, lora_r=8, lora_targets=targets),
        *(
            Rung(
                f"qlora-{scheme}",
                f"QLoRA: LoRA r=8 on {targets}, base linears in {scheme} (bitsandbytes)",
                micro_batch=g,
                lora_r=8,
                lora_targets=targets,
                lora_quantize=scheme,
            )
            for scheme in ("nf4", "int8")
        ),
        Rung("fsdp-2", "FSDP, 2 ranks (gloo)", processes=2, micro_batch=g // 2, strategy="fsdp"),
        Rung("tp-2", "tensor parallel, 2 ranks (gloo)", processes=2, micro_batch=g, tp=2),
        Rung(
            "cpu-offload",
            "FSDP + CPU offload, 2 ranks",
            processes=2,
            micro_batch=g // 2,
            strategy="fsdp",
            cpu_offload=True,
        ),  # fmt: skip
    ]


# ------------------------------------------------------------------------------------------------ in the workers


class Watch(Plugin):
    """Watches the Trainer, changing nothing: times the ``timed`` steps after ``warmup`` steps, then tracks the
    memory of the next step (from the end of the previous optimizer step to the end of its own)."""

    def __init__(self, warmup: int, timed: int):
        self.warmup, self.timed = warmup, timed
        self.marks: list[float] = []  # the clock at the end of the last warm-up step and of each timed step
        self.memory: dict[str, int] = {}
        self._tracker = None

    def after_backward(self, trainer) -> None:
        if self._tracker is not None:  # the last micro-batch's is the step's whole (local) gradient
            self.memory["gradients"] = _local_bytes(p.grad for p in trainer.model.parameters() if p.grad is not None)
            # the tracker refuses a second forward of the root module per window unless its per-module statistics
            # (not the peak) are cleared: accumulation runs one forward per micro-batch
            self._tracker.reset_mod_stats()

    def after_optimizer_step(self, trainer) -> None:
        done = trainer.step + 1  # the Trainer counts this step after its hooks
        if self.warmup <= done <= self.warmup + self.timed:
            self.marks.append(time.perf_counter())
        if self._tracker is not None:
            self.memory["peak"] = self._tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
            self._tracker.__exit__(None, None, None)
            self._tracker = None
            self.memory["parameters"] = _local_bytes(trainer.model.parameters()) + _quantization_statistics(
                trainer.model
            )
            states = [t for state in trainer.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
            self.memory["optimizer"] = _local_bytes(states)
        elif done == self.warmup + self.timed:
            self._tracker = tracker(trainer.model, trainer.optimizer)
            self._tracker.__enter__()


def _local_bytes(tensors) -> int:
    """Bytes of this process's part of each tensor (a DTensor's local shard)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


def _quantization_statistics(model: torch.nn.Module) -> int:
    """Bytes a quantized base keeps beside its packed weights (bench/memory_plan.py's ``parameter_bytes``)."""
    return parameter_bytes(model) - sum(p.nbytes for p in model.parameters())


def _corpus(vocab_size: int, tokens: int, seed: int = 0):
    """Random token ids cut into documents of 50 to 500 tokens (the packed blocks span them)."""
    from bunmyaku.data.corpus import Split

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, tokens).astype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    cuts = np.cumsum(rng.integers(50, 500, tokens // 50))
    offsets = np.concatenate([[0], cuts[cuts < tokens], [tokens]]).astype(np.int64)
    return Split(ids, offsets)


def worker(spec: dict[str, Any]) -> None:
    """Run one rung in this process (one rank of it under torchrun); write ``spec["out"]/rank-R.json``."""
    from bunmyaku.data import CausalLMCollator, PackedBlocks
    from bunmyaku.models.auto import model_class
    from bunmyaku.training import TrainArgs, Trainer
    from bunmyaku.training.distributed import process_group_from_env, rank

    rung = Rung(**spec["rung"])
    torch.set_num_threads(spec["threads"])
    with process_group_from_env("gloo" if rung.processes > 1 else None):
        torch.manual_seed(0)
        cls = model_class(spec["model"]["model_type"], "causal-lm")
        model = cls(cls.configure(spec["model"]))
        if rung.lora_r:  # as `bunmyaku finetune --lora-r` does (tasks/finetune.py): adapters, base frozen
            from bunmyaku.models.lora import add_lora
            from bunmyaku.models.quantize import quantize_base
            from bunmyaku.tasks.finetune import FinetuneArgs

            if rung.lora_quantize:
                quantize_base(model, rung.lora_quantize)
            add_lora(model, rung.lora_r, FinetuneArgs.lora_alpha, rung.lora_targets.split(","))
        steps = spec["warmup"] + spec["steps"] + 1
        args = TrainArgs(
            output_dir=str(Path(spec["out"]) / "run"),
            max_steps=steps,
            batch_size=rung.micro_batch,
            grad_accum_steps=rung.accum,
            lr=1e-4,
            warmup_steps=0,
            gradient_checkpointing=rung.checkpointing,
            strategy=rung.strategy,
            tp=rung.tp,
            cpu_offload=rung.cpu_offload,
            freeze_layers=rung.freeze_layers,
            eval_every=0,
            save_every=0,
            log_every=steps,
            device="cpu",
            progress=False,
            plot=False,
            resume=False,
        )
        tokens_per_step = rung.micro_batch * rung.accum * (rung.processes // rung.tp) * spec["max_length"]
        data = PackedBlocks(_corpus(model.config.vocab_size, tokens_per_step * (steps + 1)), spec["max_length"], EOS)
        watch = Watch(spec["warmup"], spec["steps"])
        trainer = Trainer(
            model, args, data, None, CausalLMCollator(), plugins=[watch], export_dir=None, checkpoint_at_end=False
        )
        trainer.fit()
        seconds = watch.marks[-1] - watch.marks[0]
        result = {
            "rank": rank(),
            "tokens_per_s": tokens_per_step * spec["steps"] / seconds,
            "step_s": seconds / spec["steps"],
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            **watch.memory,
        }
        write_json_atomic(Path(spec["out"]) / f"rank-{result['rank']}.json", result)


# ------------------------------------------------------------------------------------------------ the driver


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def refusal(rung: Rung, model: dict[str, Any]) -> str | None:
    """Why the Trainer would refuse ``rung`` on the CPU, by its own checks (strategy and offloading; the tensor-parallel
    split of ``model``, built on the meta device), or None when it runs."""
    from bunmyaku.models.auto import model_class
    from bunmyaku.training import TrainArgs
    from bunmyaku.training.sharding import check_strategy, check_tensor_parallel

    args = TrainArgs(strategy=rung.strategy, cpu_offload=rung.cpu_offload, tp=rung.tp)
    try:
        check_strategy(args, [], torch.device("cpu"))
        if rung.tp > 1:
            cls = model_class(model["model_type"], "causal-lm")
            with torch.device("meta"):
                check_tensor_parallel(cls(cls.configure(model)), rung.tp, rung.processes, rung.strategy)
    except ValueError as error:
        return str(error)
    return None


def measure_rung(rung: Rung, model: dict[str, Any], max_length: int, warmup: int, steps: int, threads: int,
                 timeout: float = 3600) -> list[dict[str, Any]]:  # fmt: skip
    """Run ``rung`` in fresh processes (torchrun for several) and return each rank's measurements.

    Raises:
        RuntimeError: a process failed (with the end of its output).
    """
    if warmup < 1 or steps < 1:
        raise ValueError(f"--warmup {warmup} and --steps {steps}: need at least 1 of each")
    with tempfile.TemporaryDirectory(prefix=f"ladder-{rung.name}-") as folder:
        spec = {
            "rung": asdict(rung),
            "model": model,
            "max_length": max_length,
            "warmup": warmup,
            "steps": steps,
            "threads": threads,
            "out": folder,
        }
        spec_path = Path(folder) / "spec.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        command = [sys.executable]
        if rung.processes > 1:
            port = str(_free_port())
            command += ["-m", "torch.distributed.run", "--nproc-per-node", str(rung.processes), "--master-port", port]
        command += ["-m", "bench.ladder", "--worker", str(spec_path)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"rung {rung.name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        return [json.loads((Path(folder) / f"rank-{r}.json").read_text()) for r in range(rung.processes)]


def planned(rung: Rung, model: dict[str, Any], max_length: int) -> dict[str, int]:
    """The planner's bytes per rank for ``rung``."""
    setting = Setting(
        rung.name,
        model,
        "causal-lm",
        rung.micro_batch,
        max_length,
        checkpointing=rung.checkpointing,
        freeze_layers=rung.freeze_layers,
        lora_r=rung.lora_r,
        lora_targets=rung.lora_targets if rung.lora_r else None,
        lora_quantize=rung.lora_quantize,
        strategy="fsdp" if rung.strategy == "fsdp" else "ddp",
        world_size=rung.processes,
        grad_accum=rung.accum,
        tp=rung.tp,
    )
    return predict(setting)


def run_ladder(rungs: list[Rung], model: dict[str, Any], max_length: int, warmup: int, steps: int, threads: int,
               done: Callable[[list[dict[str, Any]]], None] = lambda rows: None) -> list[dict[str, Any]]:  # fmt: skip
    """Every rung's row: the rung, the planner's bytes, each rank's measurements, or why it did not run (refused, or
    failed: the end of its error). ``done(rows)`` is called after each rung (to save what is measured so far)."""
    rows: list[dict[str, Any]] = []
    for rung in rungs:
        row: dict[str, Any] = {"rung": asdict(rung), "planned": None, "ranks": None, "not_run": refusal(rung, model)}
        if row["not_run"] is None:
            row["planned"] = planned(rung, model, max_length)
            started = time.perf_counter()
            try:
                row["ranks"] = measure_rung(rung, model, max_length, warmup, steps, threads)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                row["not_run"] = "failed: " + str(error).strip().splitlines()[-1]
            row["seconds"] = time.perf_counter() - started
        rows.append(row)
        done(rows)
    return rows


def _mb(value: int | float) -> str:
    return f"{value / MB:,.0f}"


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of ``rows`` (:func:`run_ladder`): one line per rung, per-rank figures as ``r0 / r1``."""
    lines = [
        "| rung | processes x micro-batch x accumulation | tokens/s | params + grads + optimizer MB per rank "
        "| peak MB per rank (measured) | peak MB (planner) | planner vs measured | peak RSS MB per rank |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        rung = Rung(**row["rung"])
        shape = f"{rung.processes} x {rung.micro_batch} x {rung.accum}"
        if row["ranks"] is None:
            lines.append(f"| {rung.label} | {shape} | not run: {row['not_run']} | | | | | |")
            continue
        ranks, plan = row["ranks"], row["planned"]
        states = [r["parameters"] + r["gradients"] + r["optimizer"] for r in ranks]
        state = " / ".join(_mb(s) for s in states)
        counted = plan["parameters"] + plan["gradients"] + plan["optimizer"]  # exact: equal to rank 0's to the byte?
        state += " (= planner)" if counted == states[0] else f" (planner {_mb(counted)})"
        peaks = " / ".join(_mb(r["peak"]) for r in ranks)
        rss = " / ".join(_mb(r["peak_rss"]) for r in ranks)
        predicted = _mb(plan["total"])
        error = f"{plan['total'] / max(r['peak'] for r in ranks) - 1:+.1%}"
        tokens = f"{min(r['tokens_per_s'] for r in ranks):,.0f}"  # the slowest rank's clock: the steps are collective
        lines.append(f"| {rung.label} | {shape} | {tokens} | {state} | {peaks} | {predicted} | {error} | {rss} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # one rung's process (see worker)
    parser.add_argument("--model", type=Path, help="a config.json (llama, gpt2, ...); default: the Llama above")
    parser.add_argument("--batch", type=at_least(1), default=8, help="global batch (sequences per optimizer step)")
    parser.add_argument("--max-length", type=at_least(1), default=256, help="tokens per sequence")
    parser.add_argument("--warmup", type=at_least(0), default=1, help="untimed steps first")
    parser.add_argument("--steps", type=at_least(1), default=3, help="timed steps (then one tracked step)")
    parser.add_argument("--threads", type=at_least(1), default=1, help="threads per process")
    parser.add_argument("--only", default="", help="comma-separated rung names (default: every rung)")
    parser.add_argument("--output", type=Path, default=RESULTS / "ladder", help="writes OUTPUT.json and OUTPUT.md")
    cli = parser.parse_args()
    if cli.worker is not None:
        worker(json.loads(cli.worker.read_text(encoding="utf-8")))
        return
    model = MODEL if cli.model is None else json.loads(cli.model.read_text(encoding="utf-8"))
    rungs = ladder(cli.batch, model)
    if cli.only:
        names = cli.only.split(",")
        unknown = sorted(set(names) - {r.name for r in rungs})
        if unknown:
            raise SystemExit(f"--only {unknown}: expected some of {[r.name for r in rungs]}")
        rungs = [r for r in rungs if r.name in names]
    torch.set_num_threads(cli.threads)
    started = time.perf_counter()
    machine = describe()

    def save(rows: list[dict[str, Any]]) -> None:
        summary = (
            f"{machine}; {cli.threads} thread(s) per process; global batch {cli.batch} x {cli.max_length} tokens; "
            f"{cli.warmup} warm-up + {cli.steps} timed steps + 1 tracked step per rung; "
            f"{time.perf_counter() - started:.0f} s"
        )
        write_json_atomic(cli.output.with_suffix(".json"), {"machine": summary, "model": model, "rows": rows})
        write_text_atomic(cli.output.with_suffix(".md"), f"{table(rows)}\n\n{summary}\n")
        print(f"{len(rows)} of {len(rungs)} rungs done ({rows[-1]['rung']['name']})", file=sys.stderr, flush=True)

    run_ladder(rungs, model, cli.max_length, cli.warmup, cli.steps, cli.threads, save)
    print(cli.output.with_suffix(".md").read_text(encoding="utf-8"), end="")


if __name__ == "__main__":
    main()
