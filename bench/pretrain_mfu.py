"""GPT-2 124M causal-LM pretraining throughput and model FLOPs utilisation (MFU) through ``bunmyaku pretrain``.

Runs the real pretraining path (corpus, packed blocks, Trainer with fused AdamW, bf16 autocast, optional
``torch.compile``) for a short number of steps and reports the steady-state rate, measured between two logged
steps after the first ``--skip`` (compilation and warm-up excluded).

FLOPs per token (PaLM, appendix B; nanoGPT's ``estimate_mfu``): ``6 N + 12 L d T`` for forward + backward, where
N counts the parameters without the position embeddings (the tied token embedding counts once: it is also the
LM head's matrix), L the layers, d the width and T the context. MFU = FLOPs per token x tokens/s / peak, with
the peak dense bf16 rate of the card (H100 / H200 SXM: 989.4 TFLOP/s; A100: 312).

Usage: ``python -m bench.pretrain_mfu --data input.txt --tokenizer gpt2-tokenizer-folder [--steps 60]
[--batch-size 16] [--compile] [--peak-tflops X]``; prints a ``RESULT {json}`` line and writes it to
``bench/results/pretrain-mfu-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0}
# vocab 50,257 padded to 50,304 (a multiple of 64) as nanoGPT does: the LM head's matmul tiles evenly
GPT2_124M = {"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50304}


def flops_per_token(n_params: int, layers: int, width: int, context: int) -> float:
    """Training FLOPs per token: 6 N (matmuls, forward and backward) + 12 L d T (attention scores and values)."""
    return 6 * n_params + 12 * layers * width * context


def peak_tflops(explicit: float | None) -> float:
    if explicit:
        return explicit
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    raise SystemExit(f"unknown peak bf16 rate for {name!r}: pass --peak-tflops")


def steady_rate(records: list[dict], tokens_per_step: int, skip: int) -> tuple[float, int]:
    """Tokens/s between the first logged step after ``skip`` and the last one; and the steps it spans."""
    logged = [r for r in records if "elapsed_s" in r and r["step"] > skip]
    if len(logged) < 2:
        raise SystemExit(f"need two logged steps after step {skip}; got {len(logged)}: run more --steps")
    first, last = logged[0], logged[-1]
    steps = last["step"] - first["step"]
    return steps * tokens_per_step / (last["elapsed_s"] - first["elapsed_s"]), steps


def main() -> None:
    from bunmyaku.training.args import PretrainArgs, TrainArgs
    from bunmyaku.training.pretrain import run_pretraining

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, nargs="+", help="raw text files")
    parser.add_argument("--tokenizer", required=True, help="a GPT-2 tokenizer folder (encoder.json + vocab.bpe)")
    parser.add_argument("--output-dir", default="runs/pretrain-mfu")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=20, help="steps left out of the rate (compilation, warm-up)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--shape", default="", help="override the GPT-2 124M shape, e.g. n_layer=2,n_embd=64,n_head=2")
    args = parser.parse_args()

    model_config = {**GPT2_124M, "n_positions": max(args.block_size, 1024)}
    for item in filter(None, args.shape.split(",")):
        key, value = item.split("=")
        model_config[key] = int(value)
    model_config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    pargs = PretrainArgs(
        objective="clm",
        tokenizer=args.tokenizer,
        data=args.data,
        doc_split="file",
        valid_fraction=0.02,
        block_size=args.block_size,
        model_config=model_config,
    )
    targs = TrainArgs(
        output_dir=args.output_dir,
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=6e-4,
        warmup_steps=10,
        weight_decay=0.1,
        precision="bf16" if args.device.startswith("cuda") else "fp32",
        compile=args.compile,
        eval_every=10**9,
        save_every=10**9,
        log_every=5,
        device=args.device,
        resume=False,
        progress=False,
        plot=False,
    )
    started = time.perf_counter()
    run_pretraining(pargs, targs)
    wall = time.perf_counter() - started

    out = Path(args.output_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tokens_per_step = args.batch_size * args.block_size
    rate, steps = steady_rate(records, tokens_per_step, args.skip)
    config = json.loads((out / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    # the LM head is tied to wte (counted once); position embeddings are left out, as in the formula
    n_params = sum(int(torch.tensor(s).prod()) for k, s in shapes.items() if "wpe" not in k and "lm_head" not in k)
    per_token = flops_per_token(n_params, config["n_layer"], config["n_embd"], args.block_size)
    peak = peak_tflops(args.peak_tflops) if args.device.startswith("cuda") else args.peak_tflops
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "params_without_wpe": n_params,
        "flops_per_token": per_token,
        "tokens_per_s": rate,
        "steps_timed": steps,
        "batch": [args.batch_size, args.block_size],
        "compile": args.compile,
        "achieved_tflops": per_token * rate / 1e12,
        "peak_tflops": peak,
        "mfu": per_token * rate / 1e12 / peak if peak else None,
        "final_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None),
        "wall_s": wall,
    }
    print("RESULT " + json.dumps(result), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"pretrain-mfu-{args.device.split(':')[0]}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
