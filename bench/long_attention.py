"""Long inputs: ``transformers`` Longformer vs bunmyaku's windowed Longformer vs dense SDPA, time and peak memory.

Rows ``long/<mode>/<length>`` of ``python -m bench`` (``--only long/``, ``--only long/train``,
``--only long/infer/4096``); ``python -m bench.long_attention`` prints the same table without storing it.

- ``mode``: ``train`` is forward + backward (a loss on the last hidden state, gradients into every weight; no
  optimizer step), ``infer`` a forward pass under ``torch.inference_mode``. Batch 1.
- ``length``: 1,024, 2,048, 4,096, 8,192 and 16,384 tokens; 32,768 too on CUDA.
- implementations, in fresh processes each: ``transformers`` (its ``LongformerModel``), ``bunmyaku`` (our
  ``LongformerModel``: windowed attention, chunked on CPU, FlexAttention on CUDA) and ``dense`` (our
  ``RobertaModel`` of the same width and depth, with the same weights except Longformer's global projections,
  attending densely through ``scaled_dot_product_attention``).

The model is random: width 768, 12 heads, 2 layers, FFN 3072, window 512, global attention on ``<s>``, dropout off;
per length, one checkpoint with exactly ``length + 2`` positions (RoBERTa's offset), so that the position table,
and its gradient, does not grow with the longest length measured.

Each worker loads its checkpoint, takes ``warmup`` steps, then times up to ``reps`` steps (fewer once the timed
steps have taken ``budget`` seconds, at least ``min_reps``). Memory is the peak of one step above the memory held
before it (the maximum over the timed steps): on CPU the process's resident set, its peak reset through
``/proc/self/clear_refs`` (Linux; without it the peak is the process's, marked "?"), on CUDA
``torch.cuda.max_memory_allocated``; on CPU the workers run with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB
(unless set), so that memory freed by a step goes back to the system and the next step's peak is seen whole.
Every worker prints a checksum of its output: ``transformers`` and
``bunmyaku`` compute the same function, so theirs agree; ``dense`` lets every token see every other, so its
checksum differs wherever the sequence is longer than half the window.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("transformers", "bunmyaku", "dense")
LABELS = {"transformers": "transformers Longformer", "bunmyaku": "bunmyaku windowed", "dense": "dense SDPA"}
MODES = ("train", "infer")
LENGTHS = (1024, 2048, 4096, 8192, 16384)
CUDA_LENGTHS = (*LENGTHS, 32768)
CONFIG = dict(
    vocab_size=1000,
    hidden_size=768,
    num_hidden_layers=2,
    num_attention_heads=12,
    intermediate_size=3072,
    attention_window=512,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    sep_token_id=2,
)
GLOBAL_ONLY = ("query_global", "key_global", "value_global")  # Longformer weights a RoBERTa has no place for


def row_names(device: str = "cpu", lengths: Iterable[int] | None = None) -> list[str]:
    """The rows ``long/<mode>/<length>`` in table order: every length of a mode, training first."""
    lengths = lengths or (CUDA_LENGTHS if device.startswith("cuda") else LENGTHS)
    return [f"long/{mode}/{length}" for mode in MODES for length in lengths]


def parse_row(name: str) -> tuple[str, int]:
    """``long/train/4096`` -> (``train``, 4096)."""
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "long" or parts[1] not in MODES or not parts[2].isdigit():
        raise ValueError(f"not a long-input row: {name!r} (expected long/<{'|'.join(MODES)}>/<tokens>)")
    return parts[1], int(parts[2])


def build_checkpoints(length: int, root: Path, config: dict | None = None) -> dict[str, Path]:
    """A random Longformer with ``length + 2`` positions, and the RoBERTa holding the same weights; their folders.

    Returns ``{impl: folder}``: ``transformers`` and ``bunmyaku`` load the same Longformer folder.
    """
    import torch
    import transformers

    config = {**(config or CONFIG), "max_position_embeddings": length + 2}
    torch.manual_seed(0)
    longformer = transformers.LongformerModel(transformers.LongformerConfig(**config))
    long_dir, dense_dir = root / f"longformer-{length}", root / f"roberta-{length}"
    longformer.save_pretrained(long_dir)
    roberta_config = {k: v for k, v in config.items() if k not in ("attention_window", "sep_token_id")}
    roberta = transformers.RobertaModel(transformers.RobertaConfig(**roberta_config))
    state = {k: v for k, v in longformer.state_dict().items() if not any(g in k for g in GLOBAL_ONLY)}
    roberta.load_state_dict(state, strict=True)  # every RoBERTa weight is a Longformer weight
    roberta.save_pretrained(dense_dir)
    return {"transformers": long_dir, "bunmyaku": long_dir, "dense": dense_dir}


# ------------------------------------------------------------------------------------------------
# Memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def peak_memory(device: str = "cpu"):
    """Measure the peak memory of the block above what was held when it began: yields a dict that holds, after
    the block, ``mib`` and ``exact`` (False where the peak could not be reset: it is then the process's)."""
    import torch

    out: dict = {}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield out
        torch.cuda.synchronize()
        out.update(mib=(torch.cuda.max_memory_allocated() - before) / 2**20, exact=True)
    else:
        before = _status_kib("VmRSS")
        exact = _reset_peak_rss()
        yield out
        out.update(mib=max(_status_kib("VmHWM") - before, 0) / 1024, exact=exact)


# ------------------------------------------------------------------------------------------------
# One implementation, one mode, one length (in a process of its own)


def make_step(impl: str, model_dir: Path | str, length: int, mode: str, device: str = "cpu", dtype: str = "float32"):
    """The model of ``impl`` loaded from ``model_dir`` and a step on one sequence of ``length`` tokens.

    Returns ``(step, model)``; ``step()`` runs one forward (+ backward in ``train`` mode) and returns the output's
    checksum. With a 16-bit ``dtype`` the weights stay float32 and the step runs under autocast.
    """
    import torch

    if impl == "transformers":
        import transformers

        model = transformers.LongformerModel.from_pretrained(model_dir).to(device)
    elif impl in ("bunmyaku", "dense"):
        import bunmyaku

        model = bunmyaku.from_pretrained(model_dir, device=device)
    else:
        raise ValueError(f"unknown implementation {impl!r}; expected one of {', '.join(IMPLS)}")
    model.train(mode == "train")
    vocab = model.config.vocab_size
    # a generator of its own: loading draws from the global one (initialisation before the weights are read)
    ids = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = 0  # <s>
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}
    if impl != "dense":
        global_mask = torch.zeros_like(ids)
        global_mask[0, 0] = 1
        inputs["global_attention_mask"] = global_mask.to(device)
    autocast = torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype), enabled=dtype != "float32")
    # the checksum: a signed mean, each channel weighted apart (a plain mean of |x| after LayerNorm hardly moves)
    probe = torch.linspace(-1.0, 1.0, model.config.hidden_size, device=device)

    def checksum(out: torch.Tensor) -> float:
        return float((out.detach().float() * probe).mean())

    def train_step() -> float:
        model.zero_grad(set_to_none=True)
        with autocast:
            out = model(**inputs).last_hidden_state
        out.float().pow(2).mean().backward()
        return checksum(out)

    def infer_step() -> float:
        with torch.inference_mode(), autocast:
            out = model(**inputs).last_hidden_state
        return checksum(out)

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    return (train_step if mode == "train" else infer_step), model


def measure(
    step: Callable[[], float],
    reps: int,
    warmup: int = 1,
    budget: float = 0.0,
    min_reps: int = 1,
    device: str = "cpu",
) -> dict:
    """``warmup`` steps, then timed steps (up to ``reps``; with ``budget``, none started once the timed ones took
    that many seconds and ``min_reps`` ran); each timed step's peak memory taken, their maximum kept."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    checksum = None
    for _ in range(warmup):
        checksum = step()
    times, cpu_times, peaks, exact = [], [], [], True
    while len(times) < max(reps, 1) and (not budget or sum(times) < budget or len(times) < min_reps):
        with peak_memory(device) as peak:
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            value = step()
            sync()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        checksum = value if checksum is None else checksum
        peaks.append(peak["mib"])
        exact = exact and peak["exact"]
    return {"times": times, "cpu_times": cpu_times, "peak_mib": max(peaks), "peak_exact": exact, "checksum": checksum}


def worker(impl: str, model_dir: str, length: int, mode: str, settings: dict) -> dict:
    """One (implementation, mode, length) measured in this process; the result as a dict."""
    import torch

    device = settings.get("device", "cpu")
    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    step, _ = make_step(impl, model_dir, length, mode, device, settings.get("dtype", "float32"))
    result = measure(
        step,
        reps=settings.get("reps", 3),
        warmup=settings.get("warmup", 1),
        budget=settings.get("budget", 0.0),
        min_reps=settings.get("min_reps", 1),
        device=device,
    )
    times = result["times"]
    return {
        "impl": impl,
        "mode": mode,
        "length": length,
        **result,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "load_avg": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "device": device,
        "dtype": settings.get("dtype", "float32"),
    }


def run_worker(impl: str, model_dir: Path, length: int, mode: str, settings: dict) -> dict:
    """:func:`worker` in a fresh process (so no allocation of another measurement is reused or counted)."""
    cmd = [sys.executable, "-m", "bench.long_attention", "--worker", json.dumps([impl, str(model_dir), length, mode])]
    cmd += ["--settings", json.dumps(settings)]
    # a fixed glibc mmap threshold: tensors from 1 MiB up are mapped and unmapped, so the resident set follows the
    # live tensors (with the adaptive threshold, memory freed by the warm-up stays in the heap and the peak reads low)
    env = {"MALLOC_MMAP_THRESHOLD_": str(2**20), **os.environ}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"long/{mode}/{length} [{impl}] failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


# ------------------------------------------------------------------------------------------------
# Rows


def run_rows(
    names: Iterable[str],
    settings: dict,
    on_row: Callable[[str, dict], None] | None = None,
    impls: Iterable[str] = IMPLS,
    runner: Callable[..., dict] = run_worker,
) -> dict[str, dict]:
    """Measure rows ``long/<mode>/<length>``: per length one pair of checkpoints, then every implementation.

    Returns ``{row: {impl: result, "when": ..., "settings": ...}}``; ``on_row(name, row)`` after each row (so a run
    cut short keeps what it measured). ``runner`` defaults to a fresh process per measurement.
    """
    by_length: dict[int, list[str]] = {}
    for name in names:
        by_length.setdefault(parse_row(name)[1], []).append(name)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for length, group in by_length.items():
            dirs = build_checkpoints(length, Path(tmp))
            for name in group:
                mode = parse_row(name)[0]
                row = {impl: runner(impl, dirs[impl], length, mode, settings) for impl in impls}
                row["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                row["settings"] = dict(settings)
                rows[name] = row
                if on_row:
                    on_row(name, row)
    return rows


def _mem(result: dict) -> str:
    return f"{result['peak_mib']:,.0f}" + ("" if result.get("peak_exact", True) else "?")


def _cpu(result: dict) -> float | None:
    """The median CPU time of the process over the timed steps (all its threads); None where not recorded."""
    return statistics.median(result["cpu_times"]) if result.get("cpu_times") else None


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def table(rows: dict[str, dict]) -> str:
    """Markdown: one table per mode, a line per length: the three implementations' medians and step peaks, the
    speed-ups, and the windowed model's peak per 1k tokens (constant when memory grows linearly)."""
    out = []
    for mode in MODES:
        names = sorted((n for n in rows if n.startswith(f"long/{mode}/")), key=lambda n: parse_row(n)[1])
        if not names:
            continue
        what = "forward + backward" if mode == "train" else "inference (forward under `torch.inference_mode`)"
        out += [
            f"**{mode}**: {what}",
            "",
            "| tokens | transformers Longformer | bunmyaku windowed | dense SDPA | windowed vs transformers "
            "| same, CPU time | windowed vs dense | peak MiB transformers / windowed / dense "
            "| windowed MiB per 1k tokens | reps | load avg | measured |",
            "|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|---|",
        ]
        for name in names:
            row, length = rows[name], parse_row(name)[1]
            hf, ours, dense = (row.get(impl) for impl in IMPLS)
            cells = [_time(r["median_s"]) if r else "-" for r in (hf, ours, dense)]
            vs_hf = f"**{hf['median_s'] / ours['median_s']:.2f}x**" if hf and ours else "-"
            vs_hf_cpu = f"{_cpu(hf) / _cpu(ours):.2f}x" if hf and ours and _cpu(hf) and _cpu(ours) else "-"
            vs_dense = f"{dense['median_s'] / ours['median_s']:.2f}x" if dense and ours else "-"
            mems = " / ".join(_mem(r) if r else "-" for r in (hf, ours, dense))
            per_k = f"{ours['peak_mib'] / (length / 1024):,.0f}" if ours else "-"
            reps = " / ".join(str(len(r["times"])) if r else "-" for r in (hf, ours, dense))
            load = " / ".join(f"{r['load_avg']:.1f}" if r else "-" for r in (hf, ours, dense))
            out.append(
                f"| {length:,} | {' | '.join(cells)} | {vs_hf} | {vs_hf_cpu} | {vs_dense} | {mems} | {per_k} | {reps} "
                f"| {load} | {row.get('when', '')} |"
            )
        out.append("")
    return "\n".join(out).rstrip("\n")


def checksum_note(rows: dict[str, dict]) -> str:
    """One sentence: how far apart the two Longformers' output checksums are, over every row that has both."""
    gaps = [
        abs(row["bunmyaku"]["checksum"] - row["transformers"]["checksum"])
        / max(abs(row["transformers"]["checksum"]), 1e-6)
        for row in rows.values()
        if row.get("bunmyaku") and row.get("transformers")
    ]
    if not gaps:
        return ""
    return (
        f"The transformers and windowed output checksums (in the JSON) differ by at most {max(gaps):.1e} relative "
        f"over these {len(gaps)} rows: the two compute the same function."
        if max(gaps) < 1e-3
        else f"Warning: the transformers and windowed output checksums differ by up to {max(gaps):.1e} relative."
    )


def section(rows: dict[str, dict], machine: str, device: str) -> str:
    """The BENCHMARKS.md section for ``rows``."""
    cores = f" ({os.cpu_count()} cores: above that, the run shared them with other work)" if device == "cpu" else ""
    return (
        "## Long inputs: Longformer vs transformers vs dense SDPA "
        f"(`python -m bench --only long/ --device {device}`)\n\n"
        f"Machine: {machine}. Batch 1, a random model of width 768, 12 heads, 2 layers, FFN 3072; the Longformers "
        "have window 512 and global attention on `<s>`; dense SDPA is bunmyaku's RoBERTa of the same shape and "
        "weights, attending everywhere through `scaled_dot_product_attention`. Each implementation, mode and length "
        "ran in a fresh process: warm-up steps, then timed steps (the reps column; warm-up, reps and budget per row "
        f"are in `bench/results/long-{device}.json`); median time. Peak memory: one step's peak above what the "
        "process held before it ("
        + (
            "resident set, glibc's mmap threshold fixed at 1 MiB so freed tensors leave it"
            if device == "cpu"
            else "`torch.cuda.max_memory_allocated`"
        )
        + "; max over the timed steps). Speed-ups are ratios of median wall times (greater than 1: windowed is "
        "faster); on a shared machine a process's wall time stretches with the load, its CPU time much less, so "
        'the ratio of the processes\' median CPU times per step is given too ("same, CPU time"; rows measured '
        "before it was recorded show -). " + checksum_note(rows) + " Load avg: the machine's 1-minute "
        f"load average at the end of each worker{cores}; with the machine shared, the ratios are more reliable than "
        "the absolute times.\n\n" + table(rows)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="", help="comma-separated; default 1k-16k (CPU), 1k-32k (CUDA)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--budget", type=float, default=0.0, help="seconds of timed steps per worker; 0: no limit")
    parser.add_argument("--min-reps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32, or bfloat16 / float16 under autocast")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        impl, model_dir, length, mode = json.loads(args.worker)
        print("RESULT " + json.dumps(worker(impl, model_dir, length, mode, json.loads(args.settings))), flush=True)
        return

    from bench.machine import describe

    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else None
    names = [n for n in row_names(args.device, lengths) if parse_row(n)[0] in args.modes.split(",")]
    settings = settings_from(args)
    print(f"# {describe(args.device)}", flush=True)

    def show(name: str, row: dict) -> None:
        print(name, " ".join(f"{impl} {row[impl]['median_s']:.3f}s {_mem(row[impl])}MiB" for impl in row
                             if isinstance(row[impl], dict) and "median_s" in row[impl]), flush=True)  # fmt: skip

    rows = run_rows(names, settings, on_row=show, impls=args.impls.split(","))
    print(table(rows))


def settings_from(args: argparse.Namespace) -> dict:
    """The worker settings from a command line's options."""
    return {
        "reps": args.reps,
        "warmup": args.warmup,
        "budget": args.budget,
        "min_reps": args.min_reps,
        "threads": args.threads,
        "device": args.device,
        "dtype": args.dtype,
    }


if __name__ == "__main__":
    main()
