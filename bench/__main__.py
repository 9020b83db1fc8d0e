"""``python -m bench``: each scenario for bunmyaku and transformers in fresh processes; ratios into BENCHMARKS.md.

Options: ``--only PATTERN[,PATTERN]`` (substrings of the configuration name), ``--reps N`` (timed repetitions, default
20), ``--budget S`` (stop timing a configuration after S seconds of timed steps, at least ``--min-reps``),
``--warmup N``, ``--threads N`` (torch threads in the workers; default torch's), ``--device cpu|cuda``,
``--dtype`` (default float32 on CPU, bfloat16 on CUDA; both libraries load in it, training runs under autocast),
``--rounds N`` (alternate the two implementations' processes N times per configuration, each with 1/N of the
repetitions and budget, and pool their times: a machine whose speed drifts over minutes then slows both alike),
``--compile [MODE]`` (both libraries' models compiled with ``torch.compile``, mode ``default`` unless given, for the
encoder scenarios only; rows named ``<configuration>+compile``, or ``+compile:MODE``), ``--no-write`` (print only),
``--peers`` (the DeBERTa rows also time transformers with each DeBERTa attention package of PyPI that imports:
``disentangled-flash``, on CPU through its PyTorch backend, and ``flashdeberta``, CUDA only; their processes
alternate with the other two and the stored row keeps them under ``peers``).

Long-input rows ``long/<mode>/<length>`` (``bench/long_attention.py``: transformers Longformer, bunmyaku's windowed
Longformer and dense SDPA, time and peak memory) run only when a non-empty ``--only`` pattern names them (``--only
long/``, ``--only long/train/4096``): their steps take minutes on a CPU. They take ``--reps`` (default 3 for them),
``--warmup`` (default 1), ``--budget``, ``--min-reps``, ``--threads``, ``--device`` and ``--dtype``; their results
are kept in ``bench/results/long-<device>.json`` and their BENCHMARKS.md section is rebuilt from it.

Results are kept per configuration in ``bench/results/speed-<device>.json``: a run with ``--only`` replaces
its own rows and keeps the others, and the BENCHMARKS.md section is rebuilt from all of them, each row with
the date, repetitions and load average it was measured under.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import long_attention
from bench.machine import describe
from bench.scenarios import COMPILABLE, CONFIGS, PEERS, SAME_SHAPE, Config, model_dir
from bunmyaku.hub.files import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
IMPLS = ("transformers", "bunmyaku")


def run_one(config: Config, impl: str, args: argparse.Namespace) -> dict:
    rounds = args.rounds
    cmd = [
        sys.executable, "-m", "bench.worker",
        "--scenario", config.scenario, "--model", config.model, "--variant", config.variant,
        "--batch", str(config.batch), "--impl", impl, "--device", args.device,
        "--reps", str(-(-args.reps // rounds)), "--warmup", str(args.warmup),
        "--budget", str(args.budget / rounds), "--min-reps", str(-(-args.min_reps // rounds)),
        "--threads", str(args.threads), "--dtype", args.dtype, "--compile", config.compile,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{config.name} [{impl}] failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def run_config(config: Config, args: argparse.Namespace, peers: tuple[str, ...] = ()) -> dict[str, dict]:
    """Both implementations (and ``peers``), their worker processes alternating ``args.rounds`` times; times
    pooled per implementation."""
    parts: dict[str, list[dict]] = {impl: [] for impl in (*IMPLS, *peers)}
    for _ in range(args.rounds):
        for impl in parts:
            parts[impl].append(run_one(config, impl, args))
    return {impl: pool(results) for impl, results in parts.items()}


def usable_peers(device: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """The DeBERTa kernel packages this machine can time, and why each other one is left out."""
    usable, skipped = [], {}
    for peer, module in PEERS.items():
        if importlib.util.find_spec(module) is None:
            skipped[peer] = f"not installed (pip install {peer})"
        elif peer == "flashdeberta" and not device.startswith("cuda"):
            skipped[peer] = "Triton kernels: CUDA only"
        else:
            usable.append(peer)
    return tuple(usable), skipped


def peers_table(rows: dict[str, dict]) -> str:
    """bunmyaku against the DeBERTa kernel packages, from the rows that timed them; "" when none did."""
    lines = []
    for name in ordered_names(rows):
        ours = rows[name]["bunmyaku"]
        for peer, theirs in rows[name].get("peers", {}).items():
            cpu = ""
            if "cpu_median" in theirs and "cpu_median" in ours:
                cpu = f"{theirs['cpu_median'] / ours['cpu_median']:.2f}x"
            lines.append(
                f"| {name} | transformers + {peer} | {theirs['median'] * 1e3:.0f} ms "
                f"| {ours['median'] * 1e3:.0f} ms | **{theirs['median'] / ours['median']:.2f}x** | {cpu} "
                f"| {theirs['reps']} / {ours['reps']} | {theirs['load_avg']:.1f} / {ours['load_avg']:.1f} "
                f"| {rows[name]['when']} |"
            )
    if not lines:
        return ""
    head = [
        "| configuration | peer | peer median | bunmyaku median | bunmyaku speed-up | same, CPU time | reps | load avg "
        "| measured |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + lines)


def pool(results: list[dict]) -> dict:
    """One worker result from several of the same configuration: times and per-step extras joined, peaks maxed."""
    out = dict(results[0])
    for key in ("times", "cpu_times", "ttft", "decode_tps"):
        if key in out:
            out[key] = [value for r in results for value in r[key]]
    for key in ("peak_rss_mb", "peak_gpu_mb", "load_avg"):
        values = [r[key] for r in results if r.get(key) is not None]
        out[key] = max(values) if values else None
    out["rounds"] = len(results)
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(result: dict) -> dict:
    times = result["times"]
    summary = {
        "median": statistics.median(times),
        "p10": _pct(times, 0.1),
        "p90": _pct(times, 0.9),
        "items_per_s": result["tokens"] / statistics.median(times),
        "peak_rss_mb": result["peak_rss_mb"],
        "peak_gpu_mb": result["peak_gpu_mb"],
        "reps": len(times),
        "rounds": result.get("rounds", 1),
        "load_avg": result["load_avg"],
        "threads": result["threads"],
        "dtype": result.get("dtype", "float32"),
    }
    for key in ("ttft", "decode_tps"):
        if key in result:
            summary[key] = statistics.median(result[key])
    if result.get("cpu_times"):  # rows measured before CPU time was recorded have none
        summary["cpu_median"] = statistics.median(result["cpu_times"])
    return summary


def speedup(hf: dict, ours: dict) -> float:
    """transformers time / bunmyaku time; for generation, bunmyaku decode tokens/s / transformers decode tokens/s."""
    if "decode_tps" in ours:
        return ours["decode_tps"] / hf["decode_tps"]
    return hf["median"] / ours["median"]


def table(rows: dict[str, dict], device: str) -> str:
    lines = [
        "| configuration | transformers median (p10-p90) | bunmyaku median (p10-p90) | speed-up | bunmyaku throughput "
        "| TTFT hf / ours | decode tok/s hf / ours | peak mem hf / ours (MB) | reps hf / ours | dtype | threads "
        "| rounds | load avg | measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mem_key = "peak_gpu_mb" if device.startswith("cuda") else "peak_rss_mb"
    for name in ordered_names(rows):
        hf, ours, when = rows[name]["transformers"], rows[name]["bunmyaku"], rows[name]["when"]
        unit = "sentences/s" if name.startswith("similarity") else "tokens/s"
        ttft = f"{hf['ttft'] * 1e3:.0f} / {ours['ttft'] * 1e3:.0f} ms" if "ttft" in ours else ""
        decode = f"{hf['decode_tps']:.1f} / {ours['decode_tps']:.1f}" if "decode_tps" in ours else ""
        lines.append(
            f"| {name} | {hf['median'] * 1e3:.0f} ms ({hf['p10'] * 1e3:.0f}-{hf['p90'] * 1e3:.0f}) "
            f"| {ours['median'] * 1e3:.0f} ms ({ours['p10'] * 1e3:.0f}-{ours['p90'] * 1e3:.0f}) "
            f"| **{speedup(hf, ours):.2f}x** | {ours['items_per_s']:.0f} {unit} | {ttft} | {decode} "
            f"| {hf[mem_key]:.0f} / {ours[mem_key]:.0f} | {hf['reps']} / {ours['reps']} "
            f"| {ours.get('dtype', 'float32')} | {ours.get('threads', '')} | {ours.get('rounds', 1)} "
            f"| {hf['load_avg']:.1f} / {ours['load_avg']:.1f} | {when} |"
        )
    return "\n".join(lines)


def same_shape_table(rows: dict[str, dict]) -> str:
    """bunmyaku against bunmyaku: each row of a model in ``SAME_SHAPE`` next to its baseline's row of the same
    scenario and variant (e.g. DeBERTa-v3-base vs BERT-base, 768 wide, 12 layers); "" when no such pair is stored."""
    lines = []
    for name in ordered_names(rows):
        model = name.split("/")[1] if name.count("/") >= 1 else ""
        if model not in SAME_SHAPE:
            continue
        base = name.replace(f"/{model}", f"/{SAME_SHAPE[model]}", 1)
        if base not in rows:
            continue
        ours, theirs = rows[name]["bunmyaku"], rows[base]["bunmyaku"]
        lines.append(
            f"| {name} | {base} | {ours['median'] * 1e3:.0f} ms | {theirs['median'] * 1e3:.0f} ms "
            f"| **{ours['median'] / theirs['median']:.2f}x** |"
        )
    if not lines:
        return ""
    head = [
        "| bunmyaku configuration | bunmyaku baseline (same shape) | median | baseline median | cost ratio |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(head + lines)


def ordered_names(rows: dict) -> list[str]:
    """The stored rows in table order: the configurations' order, each followed by its compiled variants."""
    names = []
    for config in CONFIGS:
        names += [config.name] if config.name in rows else []
        names += sorted(n for n in rows if n.startswith(config.name + "+compile"))
    return names


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
    parser.add_argument(
        "--only", default="", help="run configurations whose name contains this (comma-separated: any of these)"
    )
    parser.add_argument("--reps", type=int, default=None, help="default 20 (long/ rows: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="default 2 (long/ rows: 1)")
    parser.add_argument("--budget", type=float, default=0.0, help="seconds of timed steps per run; 0: no limit")
    parser.add_argument("--min-reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker; 0: torch's default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA (training: autocast)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the implementations' processes N times")
    parser.add_argument(
        "--compile", nargs="?", const="default", default="", help="compile both models (encoder scenarios)"
    )
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--peers", action="store_true", help="DeBERTa rows: also time the DeBERTa kernel packages")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    patterns = args.only.split(",")
    long_rows = long_rows_named(patterns, args.device)
    if long_rows:
        run_long(long_rows, args)
        if not any(any(p in c.name for c in CONFIGS) for p in patterns if p):
            return  # only long rows asked for: the speed section stays as it is
    args.reps = 20 if args.reps is None else args.reps
    args.warmup = 2 if args.warmup is None else args.warmup
    configs = [c for c in CONFIGS if any(p in c.name for p in patterns)]
    if args.compile:
        configs = [dataclasses.replace(c, compile=args.compile) for c in configs if c.scenario in COMPILABLE]
    for name in sorted({c.model for c in configs}):
        model_dir(name)  # build the shared checkpoints once, before timing anything
    store = RESULTS / f"speed-{args.device}.json"
    saved = json.loads(store.read_text()) if store.exists() and not args.no_write else {}
    rows, raw = saved.get("rows", {}), saved.get("raw", {})
    # the machine the rows were measured on; re-rendering (``--only`` matching nothing) keeps the stored one
    machine = describe(args.device) if configs else saved.get("machine", describe(args.device))
    peers: tuple[str, ...] = ()
    if args.peers:
        peers, skipped = usable_peers(args.device)
        for peer, why in skipped.items():
            print(f"peer {peer} left out: {why}", flush=True)
    for config in configs:
        results = run_config(config, args, peers if config.model == "deberta-v3-base" else ())
        raw[config.name] = list(results.values())
        rows[config.name] = {impl: summarize(results[impl]) for impl in IMPLS}
        if len(results) > len(IMPLS):
            rows[config.name]["peers"] = {p: summarize(r) for p, r in results.items() if p not in IMPLS}
        rows[config.name]["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        rows[config.name]["settings"] = {
            "warmup": args.warmup,
            "budget_s": args.budget,
            "max_reps": args.reps,
            "rounds": args.rounds,
        }
        hf, ours = rows[config.name]["transformers"], rows[config.name]["bunmyaku"]
        cpu = ""
        if "cpu_median" in hf and "cpu_median" in ours:
            cpu = (
                f"  CPU s {hf['cpu_median']:.2f} / {ours['cpu_median']:.2f} "
                f"({hf['cpu_median'] / ours['cpu_median']:.2f}x)"
            )
        print(
            f"{config.name:34s} transformers {hf['median'] * 1e3:9.0f} ms  bunmyaku {ours['median'] * 1e3:9.0f} ms  "
            f"speed-up {speedup(hf, ours):.2f}x  reps {hf['reps']}/{ours['reps']}  load {os.getloadavg()[0]:.1f}{cpu}",
            flush=True,
        )
        for peer, theirs in rows[config.name].get("peers", {}).items():
            print(
                f"{'':34s} {peer} {theirs['median'] * 1e3:9.0f} ms  bunmyaku speed-up vs it "
                f"{theirs['median'] / ours['median']:.2f}x  reps {theirs['reps']}",
                flush=True,
            )
        if not args.no_write:  # after every configuration: a run cut short keeps what it measured
            RESULTS.mkdir(exist_ok=True)
            write_json_atomic(store, {"machine": machine, "rows": rows, "raw": raw})
    markdown = (
        f"## Speed vs transformers on {args.device}\n\nMachine: {machine}. "
        "Each configuration ran in fresh processes per implementation (transformers first, then bunmyaku; with "
        "rounds > 1, the two alternating that many times and their times pooled): warm-up steps, then up to 20 "
        "timed repetitions, or fewer where a time budget per configuration stopped the timing earlier (the reps "
        "column says how many ran, the rounds column in how many alternations; warm-up and budget per row are in "
        f"`bench/results/speed-{args.device}.json`); median with p10-p90. Speed-up = transformers time / bunmyaku "
        "time (for generation: the ratio of decode tokens/s, measured after the first token). Load avg: the "
        "machine's 1-minute load average at the end of each run"
        + (
            f" ({os.cpu_count()} cores: above that, the run shared them with other work)"
            if args.device == "cpu"
            else ""
        )
        + ".\n\n"
        f"{table(rows, args.device)}"
    )
    same_shape = same_shape_table(rows)
    if same_shape:
        markdown += (
            "\n\nbunmyaku against itself, same width and depth (cost ratio = the model's median step time / the "
            f"baseline's, from the rows above):\n\n{same_shape}"
        )
    kernels = peers_table(rows)
    if kernels:
        markdown += (
            "\n\nbunmyaku against transformers with a DeBERTa attention package from PyPI (`--peers`), timed in the "
            "same run as the rows above (speed-up = the peer's median / bunmyaku's):\n\n" + kernels
        )
    print(markdown)
    if not args.no_write:
        print(f"wrote {write_section(markdown, args.device)}")


def long_rows_named(patterns: list[str], device: str) -> list[str]:
    """The long-input rows a non-empty pattern of ``--only`` names (an empty one, run everything, leaves them out)."""
    return [name for name in long_attention.row_names(device) if any(p and p in name for p in patterns)]


def run_long(names: list[str], args: argparse.Namespace) -> None:
    """Measure the long-input rows ``names``, store them with the rows kept from earlier runs, rebuild the section."""
    settings = {
        "reps": 3 if args.reps is None else args.reps,
        "warmup": 1 if args.warmup is None else args.warmup,
        "budget": args.budget,
        "min_reps": args.min_reps,
        "threads": args.threads,
        "device": args.device,
        "dtype": args.dtype,
    }
    store = RESULTS / f"long-{args.device}.json"
    saved = json.loads(store.read_text()) if store.exists() and not args.no_write else {}
    rows = saved.get("rows", {})
    machine = describe(args.device)

    def keep(name: str, row: dict) -> None:
        rows[name] = row
        times = "  ".join(f"{impl} {row[impl]['median_s']:8.2f} s {row[impl]['peak_mib']:7.0f} MiB"
                          for impl in long_attention.IMPLS)  # fmt: skip
        print(f"{name:20s} {times}  load {os.getloadavg()[0]:.1f}", flush=True)
        if not args.no_write:  # after every row: a run cut short keeps what it measured
            RESULTS.mkdir(exist_ok=True)
            write_json_atomic(store, {"machine": machine, "rows": rows})

    long_attention.run_rows(names, settings, on_row=keep)
    markdown = long_attention.section(rows, machine, args.device)
    print(markdown)
    if not args.no_write:
        print(f"wrote {write_section(markdown, 'long-' + args.device)}")


if __name__ == "__main__":
    main()
