"""A tiny causal-LM training run, as a script: the kill / resume and DDP tests start it in fresh processes.

Usage: ``python -m tests.training.run_tiny OUTPUT_DIR MAX_STEPS BATCH_SIZE [--dropout P] [--plugins fgm,sam,...]``;
under torchrun it joins the gloo process group first. With ``--plugins`` it trains once per plugin (the settings in
``PLUGINS``), one after the other in the same processes, into ``OUTPUT_DIR/<name>``.
"""

from __future__ import annotations

import argparse

import torch

from bunmyaku.data import CausalLMCollator, PackedBlocks
from bunmyaku.training import TrainArgs, Trainer
from bunmyaku.training.distributed import process_group_from_env
from tests.training.helpers import EOS, fail_if_group_outlived, random_split, tiny_gpt2

# TrainArgs settings per plugin; AWP starts at epoch 0.1, so its first step (epoch 0) is clean and the others are not
PLUGINS = {
    "none": {},
    "fgm": {"fgm": 1.0},
    "awp": {"awp_lr": 1.0, "awp_eps": 0.01, "awp_start_epoch": 0.1},
    "sam": {"sam": 0.05},
    "asam": {"sam": 0.5, "sam_adaptive": True},
    "llrd": {"llrd": 0.5},
    "ema": {"ema_decay": 0.5},
    "swa": {"swa_start": 0.2},  # the export averages the steps from epoch 0.2 on (steps 2 to 6 of ~7 per epoch)
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("max_steps", type=int)
    parser.add_argument("batch_size", type=int)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--plugins", default="", help="comma-separated names from PLUGINS")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    names = [name for name in cli.plugins.split(",") if name]
    runs = [(f"{cli.output_dir}/{name}", PLUGINS[name]) for name in names] or [(cli.output_dir, {})]
    with process_group_from_env("gloo"):
        for output_dir, settings in runs:
            train(cli, output_dir, settings)


def train(cli: argparse.Namespace, output_dir: str, settings: dict) -> None:
    args = TrainArgs(
        output_dir=output_dir,
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
        **settings,
    )
    model = tiny_gpt2(dropout=cli.dropout)
    train_data = PackedBlocks(random_split(60), 16, EOS, random_offset=True)
    valid = PackedBlocks(random_split(10, seed=1), 16, EOS)
    Trainer(model, args, train_data, valid, CausalLMCollator()).fit()


if __name__ == "__main__":
    main()
    fail_if_group_outlived()
