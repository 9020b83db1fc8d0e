"""Where one benchmark step spends its time: ``torch.profiler`` tables for bunmyaku and transformers.

``python -m bench.profile_step --scenario encoder-train --model bert-base --variant variable [--device cuda]``
builds the step exactly as ``python -m bench`` does (same weights, inputs, dtype), runs a few warm-up steps,
profiles ``--steps`` more, and prints the top operators by device time (CUDA) or CPU time, plus the number of
kernel launches per step: on a GPU, a step that launches many small kernels is bound by Python and launch
overhead rather than by arithmetic, and that decides which fast path can help. With ``--compile [MODE]`` both
models are compiled as in ``python -m bench --compile``, and the compiler's own account follows each table: how
many graphs it made, and why it broke the step into them (every break is a return to Python, which a CUDA graph
cannot span).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench.scenarios import BUILDERS, Config


def profile_step(impl: str, config: Config, device: str, dtype: torch.dtype, steps: int, rows: int) -> str:
    torch.manual_seed(0)
    step, _ = BUILDERS[config.scenario](impl, config, device, dtype)
    cuda = device.startswith("cuda")
    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines = [f"== {impl}: {config.name} on {device} ({dtype}), {steps} steps"]
    if cuda:
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        busy = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        lines.append(f"kernels per step: {kernels / steps:.0f}; GPU busy per step: {busy / steps / 1e3:.2f} ms")
    lines.append(events.table(sort_by=sort, row_limit=rows))
    if config.compile:
        lines.append(_compiler_account())
    return "\n".join(lines)


def _compiler_account() -> str:
    """Graphs, graph breaks (with their reasons) and recompilations so far in this process."""
    from torch._dynamo.utils import counters

    stats = dict(counters["stats"])
    lines = [f"compiler: {stats.get('unique_graphs', 0)} graphs, frames {dict(counters['frames'])}"]
    for reason, count in counters["graph_break"].items():
        lines.append(f"  graph break x{count}: {reason.splitlines()[0][:160]}")
    for reason, count in counters["recompiles"].items():
        lines.append(f"  recompile x{count}: {str(reason).splitlines()[0][:160]}")
    counters.clear()
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="encoder-train")
    parser.add_argument("--model", default="bert-base")
    parser.add_argument("--variant", default="variable")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--impl", choices=["bunmyaku", "transformers", "both"], default="both")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--compile", nargs="?", const="default", default="", metavar="MODE", help="torch.compile both")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    config = Config(args.scenario, args.model, args.variant, args.batch, args.compile)
    impls = ["transformers", "bunmyaku"] if args.impl == "both" else [args.impl]
    for impl in impls:
        print(profile_step(impl, config, args.device, dtype, args.steps, args.rows), flush=True)


if __name__ == "__main__":
    main()
