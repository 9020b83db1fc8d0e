"""Tiny masked-LM runs of models whose forward leaves parameters without a gradient, as a script:
tests/training/test_unused_parameters.py starts it.

Longformer without global tokens never uses its global projections (``q_global`` ...); BigBird's masked-LM head
keeps the checkpoint's pooler and never reads it. Usage: ``python -m tests.training.run_unused OUTPUT_DIR two``
under torchrun with 2 processes (writes ``ddp/<model>/`` and ``fsdp/<model>/``), then
``python -m tests.training.run_unused OUTPUT_DIR one`` (writes ``single/<model>/``). Every run: 4 steps of 2
micro-batches; each process reads its half of every global batch of 8 rows, the single process all of it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bunmyaku.training import TrainArgs, Trainer
from bunmyaku.training.distributed import process_group_from_env, rank, world_size
from tests.training.helpers import MASK, VOCAB, Plan, fail_if_group_outlived

LENGTH, ROWS = 24, 8  # tokens per row, rows per micro-batch over all processes


def tiny_model(name: str):
    """A tiny masked-LM model with parameters a forward may leave unused."""
    torch.manual_seed(0)
    sizes = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, dropout=0.0, attention_dropout=0.0)
    if name == "longformer":
        from bunmyaku.models.longformer import LongformerConfig, LongformerForMaskedLM

        return LongformerForMaskedLM.from_config(LongformerConfig(**sizes, max_seq_len=LENGTH + 2, attention_window=8))
    from bunmyaku.models.big_bird import BigBirdConfig, BigBirdForMaskedLM

    return BigBirdForMaskedLM.from_config(BigBirdConfig(**sizes, max_seq_len=LENGTH, attention_type="original_full"))


def batches(micro_batches: int) -> list[dict[str, torch.Tensor]]:
    """This process's rows of every micro-batch: a 15% masking of random ids, every row the same length."""
    gen = torch.Generator().manual_seed(0)
    share = ROWS // world_size()
    out = []
    for _ in range(micro_batches):
        ids = torch.randint(5, VOCAB, (ROWS, LENGTH), generator=gen)
        masked = torch.rand(ROWS, LENGTH, generator=gen) < 0.15
        masked[:, 1] = True  # at least one target in every row
        rows = slice(rank() * share, (rank() + 1) * share)
        out.append(
            {
                "input_ids": ids.masked_fill(masked, MASK)[rows],
                "attention_mask": torch.ones(share, LENGTH, dtype=torch.long),
                "labels": ids.masked_fill(~masked, -100)[rows],
            }
        )
    return out


def train(output_dir: Path, name: str, **settings) -> None:
    args = TrainArgs(
        output_dir=str(output_dir),
        max_steps=4,
        batch_size=ROWS // world_size(),
        grad_accum_steps=2,
        lr=3e-3,
        warmup_steps=1,
        log_every=1,
        eval_every=0,
        save_every=0,
        device="cpu",
        progress=False,
        plot=False,
        **settings,
    )
    Trainer(tiny_model(name), args, Plan(batches(8)), checkpoint_at_end=False).fit()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("mode", choices=["one", "two"])
    cli = parser.parse_args()
    torch.set_num_threads(1)
    with process_group_from_env("gloo"):
        for name in ("longformer", "big_bird"):
            if cli.mode == "one":
                train(cli.output_dir / "single" / name, name)
            else:
                train(cli.output_dir / "ddp" / name, name)
                train(cli.output_dir / "fsdp" / name, name, strategy="fsdp")


if __name__ == "__main__":
    main()
    fail_if_group_outlived()
