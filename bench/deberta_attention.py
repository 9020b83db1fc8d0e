"""DeBERTa's disentangled attention alone: `transformers`' module vs the same projections followed by bunmyaku's
reference and fast paths, forward + backward, at deberta-v3-base shapes (12 heads of 64, buckets 256, c2p|p2c).

python -m bench.deberta_attention [--batch 8] [--lengths 128,512] [--reps 3] [--device cpu|cuda] [--dtype float32]
[--attention-only]

Each (implementation, length, fixed / padded) runs in a fresh process, so that its peak resident memory (CPU) or
peak allocated memory (CUDA) is its own; the median of ``--reps`` timed steps after one warm-up is printed, wall
time and the process's CPU time, with the load average at the end; the ratios are of CPU time, steadier than wall
time on a shared machine (with one thread: more threads add their waits to it). The
padded batch has rows of 100%, 75%, 50% and 25% of the length, in turn; ``packed`` runs it as a model does a
ragged batch (projections on the real tokens, attention by row groups). The loss is the mean square of the output
(over the real tokens for ``packed``, over every position otherwise).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

HIDDEN, HEADS, SPAN, MAX_RELATIVE = 768, 12, 256, 512
IMPLS = ("transformers", "reference", "fast", "packed")  # packed: padded batches only


def _module_and_inputs(batch: int, length: int, padded: bool, device: str, dtype: torch.dtype):
    from transformers import DebertaV2Config
    from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention, build_relative_position

    config = DebertaV2Config(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_buckets=SPAN,
        max_relative_positions=MAX_RELATIVE,
        share_att_key=True,
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )
    module = DisentangledSelfAttention(config).to(device=device, dtype=dtype)
    x = torch.randn(batch, length, HIDDEN, device=device, dtype=dtype, requires_grad=True)
    rel_embeddings = torch.randn(2 * SPAN, HIDDEN, device=device, dtype=dtype, requires_grad=True)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    if padded:
        for row in range(batch):
            mask[row, length * (4 - row % 4) // 4 :] = 0
    relative_pos = build_relative_position(x, x, bucket_size=SPAN, max_position=MAX_RELATIVE)
    return module, x, rel_embeddings, mask, relative_pos


def _step(impl: str, batch: int, length: int, padded: bool, device: str, dtype: torch.dtype, attention_only: bool):
    from bunmyaku.models.disentangled import disentangled_attention, packed_disentangled_attention
    from bunmyaku.models.fastpath import Packing

    module, x, rel_embeddings, mask, relative_pos = _module_and_inputs(batch, length, padded, device, dtype)
    head_dim = HIDDEN // HEADS

    def heads(t: torch.Tensor) -> torch.Tensor:  # (..., N, C) -> (..., H, N, D)
        return t.unflatten(-1, (HEADS, head_dim)).transpose(-3, -2)

    scale = 1 / math.sqrt(head_dim * 3)
    if attention_only:  # the attention function alone, on fixed projections (leaves, so that gradients reach them)
        with torch.no_grad():
            q, k, v = heads(module.query_proj(x)), heads(module.key_proj(x)), heads(module.value_proj(x))
            pos_q, pos_k = heads(module.query_proj(rel_embeddings)), heads(module.key_proj(rel_embeddings))
            packing = Packing.from_mask(mask)
            if impl == "packed":
                q, k, v = (
                    packing.unpad(t.transpose(1, 2).flatten(2)).unflatten(-1, (HEADS, head_dim)) for t in (q, k, v)
                )
        q, k, v, pos_q, pos_k = (t.contiguous().requires_grad_() for t in (q, k, v, pos_q, pos_k))

        def attend() -> None:
            if impl == "packed":
                out = packed_disentangled_attention(q, k, v, pos_q, pos_k, relative_pos[0], SPAN, packing, scale)
            else:
                out = disentangled_attention(q, k, v, pos_q, pos_k, relative_pos[0], SPAN, mask, scale, impl=impl)
            out.float().square().mean().backward()

        return attend

    def step() -> None:
        if impl == "transformers":
            extended = mask[:, None, None, :] * mask[:, None, :, None]
            out = module(x, extended, relative_pos=relative_pos, rel_embeddings=rel_embeddings)[0]
        elif impl == "packed":  # as a model runs a ragged batch: projections and attention on the real tokens only
            packing = Packing.from_mask(mask)
            tokens = packing.unpad(x)  # (N, C)
            q, k, v = (
                proj(tokens).unflatten(-1, (HEADS, head_dim))
                for proj in (module.query_proj, module.key_proj, module.value_proj)
            )  # (N, H, D)
            pos_q, pos_k = heads(module.query_proj(rel_embeddings)), heads(module.key_proj(rel_embeddings))
            out = packed_disentangled_attention(q, k, v, pos_q, pos_k, relative_pos[0], SPAN, packing, scale)
        else:
            q, k, v = heads(module.query_proj(x)), heads(module.key_proj(x)), heads(module.value_proj(x))
            pos_q, pos_k = heads(module.query_proj(rel_embeddings)), heads(module.key_proj(rel_embeddings))
            out = disentangled_attention(q, k, v, pos_q, pos_k, relative_pos[0], SPAN, mask, scale, impl=impl)
            out = out.transpose(1, 2).flatten(2)
        out.float().square().mean().backward()

    return step


def run_one(
    impl: str, batch: int, length: int, padded: bool, device: str, dtype: str, reps: int, attention_only: bool
) -> dict:
    """Times and peak memory of one configuration, in this process."""
    torch.manual_seed(0)
    step = _step(impl, batch, length, padded, device, getattr(torch, dtype), attention_only)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    step()
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for _ in range(reps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "ms": statistics.median(times) * 1e3,
        "cpu_ms": statistics.median(cpu_times) * 1e3,
        "peak_mb": peak,
        "load_avg": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", default="128,512")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--attention-only",
        action="store_true",
        help="time the attention function alone on fixed projections: bunmyaku's paths, against the reference",
    )
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # impl:length:padded, in a worker process
    args = parser.parse_args()
    if args.one:
        impl, length, padded = args.one.split(":")
        result = run_one(
            impl, args.batch, int(length), padded == "1", args.device, args.dtype, args.reps, args.attention_only
        )
        print("RESULT " + json.dumps(result))
        return

    from bench.machine import describe

    impls = IMPLS[1:] if args.attention_only else IMPLS
    what = "the attention function alone" if args.attention_only else "the attention module (with its projections)"
    print(f"# {what}, forward + backward, B={args.batch}, H={HEADS}, D=64, span={SPAN}, {args.dtype}")
    print(f"# {describe(args.device)}")
    print(
        f"{'T':>5} {'batch':>7} {'impl':>13} {'ms':>9} {'cpu ms':>9} {'peak MB':>9} "
        f"{'cpu vs ' + impls[0]:>20} {'load':>5}"
    )
    for length in (int(n) for n in args.lengths.split(",")):
        for padded in (False, True):
            base = None
            for impl in impls if padded else impls[:-1]:
                command = [sys.executable, "-m", "bench.deberta_attention", "--one", f"{impl}:{length}:{int(padded)}"]
                command += ["--batch", str(args.batch), "--reps", str(args.reps), "--device", args.device]
                command += ["--dtype", args.dtype] + (["--attention-only"] if args.attention_only else [])
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                line = next(row for row in done.stdout.splitlines() if row.startswith("RESULT "))
                result = json.loads(line.removeprefix("RESULT "))
                base = base or result["cpu_ms"]
                kind = "padded" if padded else "fixed"
                print(
                    f"{length:>5} {kind:>7} {impl:>13} {result['ms']:>9.1f} {result['cpu_ms']:>9.1f} "
                    f"{result['peak_mb']:>9.0f} {base / result['cpu_ms']:>19.2f}x {result['load_avg']:>5.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
