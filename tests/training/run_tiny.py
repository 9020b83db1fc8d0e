"""A tiny causal-LM training run, as a script: the kill / resume and DDP tests start it in fresh processes.

Usage: ``python -m tests.training.run_tiny OUTPUT_DIR MAX_STEPS BATCH_SIZE [--dropout P] [--swa-start E]``; under
torchrun it joins the gloo process group first.
"""

from __future__ import annotations

import argparse

import torch

from bunmyaku.data import CausalLMCollator, PackedBlocks
from bunmyaku.training import TrainArgs, Trainer
from bunmyaku.training.distributed import process_group_from_env
from tests.training.helpers import EOS, random_split, tiny_gpt2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("max_steps", type=int)
    parser.add_argument("batch_size", type=int)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--swa-start", type=float, default=0.0)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    with process_group_from_env("gloo"):
        args = TrainArgs(
            output_dir=cli.output_dir,
            max_steps=cli.max_steps,
            batch_size=cli.batch_size,
            grad_accum_steps=2,
            lr=3e-3,
            warmup_steps=2,
            eval_every=3,
            save_every=cli.save_every,
            keep_last=2,
            device="cpu",
            progress=False,
            plot=False,
            swa_start=cli.swa_start,
        )
        model = tiny_gpt2(dropout=cli.dropout)
        train = PackedBlocks(random_split(60), 16, EOS, random_offset=True)
        valid = PackedBlocks(random_split(10, seed=1), 16, EOS)
        Trainer(model, args, train, valid, CausalLMCollator()).fit()


if __name__ == "__main__":
    main()
