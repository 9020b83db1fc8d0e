"""``python -m bench.long_attention``: Longformer forward + backward at long lengths, bunmyaku vs ``transformers``.

One random Longformer (hidden 768, 12 heads, 2 layers, window 512, global attention on ``<s>``, dropout off) is
saved once; each (implementation, length) then runs in a fresh process that loads it, takes a warm-up step and
times ``--reps`` steps of forward + backward on one sequence, in wall-clock and in the process's CPU time (which
a machine shared with other work inflates less, with one thread). Memory is the peak resident set during one step,
above the resident set before it (Linux: the peak is reset through ``/proc/self/clear_refs``). Both processes
print a checksum of the output, so the two implementations are seen to compute the same thing.

Options: ``--lengths 1024,4096``, ``--reps N`` (default 3), ``--threads N`` (default: ``OMP_NUM_THREADS`` or torch's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.machine import describe

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("transformers", "bunmyaku")
CONFIG = dict(
    vocab_size=1000,
    hidden_size=768,
    num_hidden_layers=2,
    num_attention_heads=12,
    intermediate_size=3072,
    attention_window=512,
    max_position_embeddings=4098,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    sep_token_id=2,
)


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


def worker(impl: str, model_dir: str, length: int, reps: int, threads: int) -> dict:
    """Load the model with ``impl``, time forward + backward at ``length`` tokens; the measurements as a dict."""
    import torch

    torch.set_num_threads(threads)
    if impl == "transformers":
        import transformers

        model = transformers.LongformerModel.from_pretrained(model_dir)
    else:
        import bunmyaku

        model = bunmyaku.from_pretrained(model_dir)
    model.train()
    # a generator of its own: loading draws from the global one (initialisation before the weights are read)
    ids = torch.randint(3, CONFIG["vocab_size"], (1, length), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = 0
    mask = torch.ones_like(ids)
    global_mask = torch.zeros_like(ids)
    global_mask[0, 0] = 1

    def step() -> float:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, global_attention_mask=global_mask).last_hidden_state
        out.float().pow(2).mean().backward()
        return float(out.detach().abs().mean())

    checksum = step()  # warm-up
    model.zero_grad(set_to_none=True)
    rss_before = _status_kib("VmRSS")
    exact_peak = _reset_peak_rss()
    step()
    peak_kib = _status_kib("VmHWM") - rss_before
    times, cpu_times = [], []
    for _ in range(reps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "impl": impl,
        "length": length,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "cpu_s": statistics.median(cpu_times),
        "peak_rss_mib": peak_kib / 1024,
        "peak_exact": exact_peak,
        "checksum": checksum,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "MODEL_DIR", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import torch

        impl, model_dir, length = args.worker
        threads = args.threads or torch.get_num_threads()
        print("RESULT " + json.dumps(worker(impl, model_dir, int(length), args.reps, threads)), flush=True)
        return

    import torch
    import transformers

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        transformers.LongformerModel(transformers.LongformerConfig(**CONFIG)).save_pretrained(tmp)
        print(f"# Longformer fwd+bwd, batch 1, hidden 768, 2 layers, window 512, global <s>; {describe()}")
        header = f"{'length':>7} {'impl':>13} {'median s':>9} {'min s':>7} {'CPU s':>7}"
        print(f"{header} {'peak RSS MiB':>13} {'checksum':>10}")
        for length in (int(x) for x in args.lengths.split(",")):
            rows = {}
            for impl in IMPLS:
                cmd = [sys.executable, "-m", "bench.long_attention", "--worker", impl, tmp, str(length)]
                cmd += ["--reps", str(args.reps), "--threads", str(args.threads)]
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    raise SystemExit(f"{impl} at {length} tokens failed:\n{proc.stderr[-3000:]}")
                r = rows[impl] = json.loads(line[len("RESULT ") :])
                peak = f"{r['peak_rss_mib']:.0f}" + ("" if r["peak_exact"] else "?")
                times = f"{r['median_s']:>9.3f} {r['min_s']:>7.3f} {r['cpu_s']:>7.3f}"
                print(f"{length:>7} {impl:>13} {times} {peak:>13} {r['checksum']:>10.6f}")
            hf, ours = rows["transformers"], rows["bunmyaku"]
            print(
                f"{length:>7} {'ratio':>13} {hf['median_s'] / ours['median_s']:>8.2f}x faster "
                f"({hf['cpu_s'] / ours['cpu_s']:.2f}x in CPU time), "
                f"{hf['peak_rss_mib'] / max(ours['peak_rss_mib'], 1):.2f}x less peak memory",
                flush=True,
            )


if __name__ == "__main__":
    main()
