"""``python -m bench``: each scenario for bunmyaku and transformers in fresh processes; ratios into BENCHMARKS.md.

Options: ``--only PATTERN`` (substring of the configuration name), ``--reps N`` (timed repetitions, default
20), ``--device cpu|cuda``, ``--no-write`` (print only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench.machine import describe
from bench.scenarios import CONFIGS, Config, model_dir

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
IMPLS = ("transformers", "bunmyaku")


def run_one(config: Config, impl: str, device: str, reps: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.worker",
        "--scenario",
        config.scenario,
        "--model",
        config.model,
        "--variant",
        config.variant,
        "--batch",
        str(config.batch),
        "--impl",
        impl,
        "--device",
        device,
        "--reps",
        str(reps),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{config.name} [{impl}] failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(result: dict) -> dict:
    times = result["times"]
    summary = {
        "median": statistics.median(times),
        "p10": _pct(times, 0.1),
        "p90": _pct(times, 0.9),
        "tokens_per_s": result["tokens"] / statistics.median(times),
        "peak_rss_mb": result["peak_rss_mb"],
        "peak_gpu_mb": result["peak_gpu_mb"],
        "reps": len(times),
    }
    for key in ("ttft", "decode_tps"):
        if key in result:
            summary[key] = statistics.median(result[key])
    return summary


def table(rows: list[tuple[Config, dict, dict]], device: str) -> str:
    unit = "sentences/s" if any(c.scenario == "similarity" for c, _, _ in rows) else "tokens/s"
    lines = [
        f"| configuration | transformers median (p10-p90) | bunmyaku median (p10-p90) | speed-up | bunmyaku {unit} "
        "| TTFT hf / ours | decode tok/s hf / ours | peak mem hf / ours (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mem_key = "peak_gpu_mb" if device.startswith("cuda") else "peak_rss_mb"
    for config, hf, ours in rows:
        ttft = f"{hf['ttft'] * 1e3:.0f} / {ours['ttft'] * 1e3:.0f} ms" if "ttft" in ours else ""
        decode = f"{hf['decode_tps']:.0f} / {ours['decode_tps']:.0f}" if "decode_tps" in ours else ""
        speedup = hf["median"] / ours["median"]
        if "decode_tps" in ours:
            speedup = ours["decode_tps"] / hf["decode_tps"]
        lines.append(
            f"| {config.name} | {hf['median'] * 1e3:.1f} ms ({hf['p10'] * 1e3:.1f}-{hf['p90'] * 1e3:.1f}) "
            f"| {ours['median'] * 1e3:.1f} ms ({ours['p10'] * 1e3:.1f}-{ours['p90'] * 1e3:.1f}) | **{speedup:.2f}x** "
            f"| {ours['tokens_per_s']:.0f} | {ttft} | {decode} | {hf[mem_key]:.0f} / {ours[mem_key]:.0f} |"
        )
    return "\n".join(lines)


def write_section(markdown: str, device: str) -> Path:
    """Replace this device's section of BENCHMARKS.md (between markers), keeping every other section."""
    path = ROOT / "BENCHMARKS.md"
    start, end = f"<!-- bench:{device}:start -->", f"<!-- bench:{device}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{markdown}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="", help="run configurations whose name contains this")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    configs = [c for c in CONFIGS if args.only in c.name]
    for name in sorted({c.model for c in configs}):
        model_dir(name)  # build the shared checkpoints once, before timing anything
    rows, raw = [], []
    for config in configs:
        results = {impl: run_one(config, impl, args.device, args.reps) for impl in IMPLS}
        raw += list(results.values())
        hf, ours = summarize(results["transformers"]), summarize(results["bunmyaku"])
        rows.append((config, hf, ours))
        print(
            f"{config.name:40s} transformers {hf['median'] * 1e3:9.1f} ms  bunmyaku {ours['median'] * 1e3:9.1f} ms  "
            f"speed-up {hf['median'] / ours['median']:.2f}x",
            flush=True,
        )
    machine = describe(args.device)
    markdown = (
        f"## Speed vs transformers on {args.device}\n\nMachine: {machine}. "
        f"Each configuration ran in a fresh process per implementation: warm-up, then "
        f"{args.reps} timed repetitions; median with p10-p90. Speed-up = transformers time / bunmyaku time "
        f"(for generation: decode tokens/s ratio).\n\n{table(rows, args.device)}"
    )
    print(markdown)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"speed-{args.device}.json").write_text(json.dumps({"machine": machine, "raw": raw}, indent=1))
        print(f"wrote {write_section(markdown, args.device)}")


if __name__ == "__main__":
    main()
