"""Tiny models and corpora for the training tests (HF's tiny sizes: hidden 32, 2 layers, 4 heads, vocab 99)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np

from bunmyaku.data import Split

VOCAB = 99
CLS, SEP, PAD, MASK, EOS = 1, 2, 0, 3, 4


def tiny_gpt2(seed: int = 0, dropout: float = 0.0):
    import torch

    from bunmyaku.models.gpt2 import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        max_seq_len=32,
        dropout=dropout,
        embd_dropout=dropout,
        attention_dropout=dropout,
    )
    return GPT2LMHeadModel.from_config(config)


def tiny_bert(task: str = "masked-lm", seed: int = 0):
    import torch

    from bunmyaku.models.bert import BertConfig, BertForMaskedLM, BertForPreTraining

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=32, dropout=0.0, attention_dropout=0.0
    )
    cls = BertForMaskedLM if task == "masked-lm" else BertForPreTraining
    return cls.from_config(config)


def random_split(num_docs: int = 40, seed: int = 0, low: int = 5, high: int = 60) -> Split:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(10, VOCAB, rng.integers(low, high)) for _ in range(num_docs)]
    tokens = np.concatenate(docs).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    return Split(tokens, offsets)


class Plan:
    """A batch plan of ready batches: the Trainer draws them as they come, with no collator."""

    def __init__(self, batches):
        self.batches, self.position, self.batches_per_epoch = batches, 0, len(batches)

    def next_batch(self):
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def gloo_threads() -> list[str]:
    """Names of this process's live gloo threads (Linux's /proc; none elsewhere)."""
    names = []
    tasks = Path("/proc/self/task")
    for task in tasks.iterdir() if tasks.is_dir() else ():
        with contextlib.suppress(OSError):  # a thread that ended while listed
            names.append((task / "comm").read_text().strip())
    return [name for name in names if "gloo" in name]


def fail_if_group_outlived() -> None:
    """End a torchrun script with exit status 3 when gloo's threads are still alive after it destroyed its process
    group: then destroy_process_group could not free the group (something still holds it), and its threads would
    run on into the interpreter's shutdown, where freeing a tensor aborts the process (SIGABRT, "terminate called
    without an active exception"; see bunmyaku.training.distributed.process_group_from_env) in a few runs of many.
    This check fails every time instead."""
    alive = gloo_threads()
    if alive:
        sys.stderr.write(f"rank {os.environ.get('RANK')}: the process group outlived destroy_process_group: {alive}\n")
        sys.stderr.flush()
        os._exit(3)  # also from an atexit hook, whose exceptions do not change the exit status
