"""Run one benchmark configuration for one implementation in this (fresh) process; print JSON.

python -m bench.worker --scenario encoder-infer --model minilm --variant variable --impl bunmyaku

Warm-up steps first, then up to ``--reps`` timed steps; with ``--budget``, timing stops once that many
seconds of timed steps have run (after at least ``--min-reps``), so a heavy scenario fits a time limit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from bench.scenarios import BUILDERS, PEERS, Config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--variant", default="")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--impl", choices=["bunmyaku", "transformers", *PEERS], required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--budget", type=float, default=0.0, help="seconds of timed steps at most; 0: no limit")
    parser.add_argument("--min-reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (training: autocast)")
    parser.add_argument("--compile", default="", help="torch.compile mode for the model (encoder scenarios)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = Config(args.scenario, args.model, args.variant, args.batch, args.compile)
    torch.manual_seed(0)
    step, tokens = BUILDERS[config.scenario](args.impl, config, args.device, getattr(torch, args.dtype))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    sync()
    times, cpu_times, extras = [], [], []
    while len(times) < args.reps and (not args.budget or sum(times) < args.budget or len(times) < args.min_reps):
        start, cpu_start = time.perf_counter(), time.process_time()
        extra = step()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        if extra:
            extras.append(extra)
    result = {
        "config": config.name,
        "impl": args.impl,
        "times": times,
        # this process's CPU seconds per step (all its threads): on a shared machine, steadier than wall time
        "cpu_times": cpu_times,
        "tokens": tokens,
        "load_avg": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None,
    }
    if extras:
        result.update({key: [e[key] for e in extras] for key in extras[0]})
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
