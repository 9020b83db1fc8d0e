"""Tiny runs with ``tp 2`` (tensor parallelism), as a script: tests/training/test_tensor_parallel.py starts it.

Usage: ``python -m tests.training.run_tp OUTPUT_DIR two`` under torchrun with 2 processes, then
``python -m tests.training.run_tp OUTPUT_DIR one`` in 1 process (the oracle: no parallelism at all, the same
batches). Each writes, per model, a run folder ``<model>-<mode>/`` (metrics.jsonl and the exported HF folder) and
``generate-<mode>.json`` (greedy tokens of the trained tiny GPT-2 and Llamas, with the KV cache),
``local-<mode>.json`` (rank 0's attention head counts and projection weight shapes) and ``vocab-<mode>.json``
(every process's rows of the vocabulary table and head). The models: ``gpt2`` (tied head), ``llama``
(grouped-query attention, untied head), ``llama-tied``, ``bert`` (a sequence classifier on padded batches) and
``bert-mlm`` (a masked-LM head, tied).
``two`` also writes ``resumed-two/`` (the GPT-2 interrupted during step 3, resumed from its sharded step-2
checkpoint) and ``one`` ``resumed-one/`` (1 process resuming that 2-process checkpoint). ``four`` (4 processes)
trains the GPT-2 with ``tp 2`` and ``strategy fsdp`` on a 2 x 2 mesh into ``gpt2-four/`` (micro-batches of 2 per
data-parallel replica: the same global batch). ``one`` and ``two`` also train the GPT-2 with each plugin of
``TP_PLUGINS`` into ``gpt2-<plugin>-<mode>/`` (EMA: a split average; SAM: a norm over split and whole gradients).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from bunmyaku.data import CausalLMCollator, PackedBlocks
from bunmyaku.training import TrainArgs, Trainer, sharding
from bunmyaku.training.distributed import is_main, process_group_from_env
from tests.training.helpers import EOS, MASK, PAD, VOCAB, fail_if_group_outlived, random_split, tiny_gpt2
from tests.training.run_fsdp import Interrupt, Interrupted

TP_PLUGINS = {"ema": {"ema_decay": 0.5}, "sam": {"sam": 0.05}}


def tiny_llama(seed: int = 0, tied: bool = False):
    from bunmyaku.models.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=48,
        max_seq_len=32,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM.from_config(config)


def tiny_bert_classifier(seed: int = 0):
    from bunmyaku.models.bert import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        max_seq_len=32,
        dropout=0.0,
        attention_dropout=0.0,
        id2label={0: "a", 1: "b", 2: "c"},
    )
    return BertForSequenceClassification.from_config(config)


def tiny_bert_mlm(seed: int = 0):
    from bunmyaku.models.bert import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=32, dropout=0.0, attention_dropout=0.0
    )
    return BertForMaskedLM.from_config(config)


class Classification:
    """Summed cross-entropy of a sequence classifier (the Trainer's objective contract)."""

    def count(self, batch):
        return {"loss": batch["labels"].numel()}

    def __call__(self, model, batch):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return {"loss": F.cross_entropy(logits, batch["labels"], reduction="sum")}, {}


class MaskedLM:
    """Summed cross-entropy at the masked positions (labels != -100) of a masked-LM head."""

    def count(self, batch):
        return {"loss": int((batch["labels"] != -100).sum())}

    def __call__(self, model, batch):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return {"loss": F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")}, {}


def mlm_data(n: int, seed: int):
    """Rows of ``classification_data`` with a fixed quarter of their tokens (at least one) masked: the same batches on
    every process, whatever each one's random state."""
    g = torch.Generator().manual_seed(seed + 100)
    rows = []
    for row in classification_data(n, seed):
        masked = torch.rand(len(row["ids"]), generator=g) < 0.25
        masked[0] = True
        labels = torch.where(masked, row["ids"], -100)
        rows.append({"ids": torch.where(masked, MASK, row["ids"]), "token_labels": labels, "label": row["label"]})
    return rows


def classification_data(n: int, seed: int):
    """Right-padded rows of 5 to 16 tokens (the packed encoder path), labels from the first token."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(5, 17, (1,), generator=g))
        ids = torch.randint(5, VOCAB, (length,), generator=g)
        rows.append({"ids": ids, "label": int(ids[0]) % 3})
    return rows


def collate(rows, **_):  # the epoch and indices the loader passes are not needed
    width = max(len(r["ids"]) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["ids"])], mask[i, : len(r["ids"])] = r["ids"], 1
    if "token_labels" in rows[0]:  # masked-LM rows: per-token labels, -100 at padding
        labels = torch.full((len(rows), width), -100)
        for i, r in enumerate(rows):
            labels[i, : len(r["ids"])] = r["token_labels"]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r["label"] for r in rows])}


def args(output_dir: Path, **settings) -> TrainArgs:
    return TrainArgs(
        output_dir=str(output_dir),
        max_steps=4,
        grad_accum_steps=2,
        lr=3e-3,
        warmup_steps=1,
        eval_every=2,
        max_grad_norm=0.5,  # small: clipping acts
        log_every=1,
        device="cpu",
        progress=False,
        plot=False,
        **{"batch_size": 4, "save_every": 0, **settings},
    )


def train_lm(model, output_dir: Path, plugins=(), **settings):
    train_data = PackedBlocks(random_split(40), 16, EOS, random_offset=True)
    valid = PackedBlocks(random_split(6, seed=1), 16, EOS)
    trainer = Trainer(model, args(output_dir, **settings), train_data, valid, CausalLMCollator(), plugins=plugins)
    trainer.fit()
    return trainer.unwrapped_model


def generated(model) -> list[list[int]]:
    model.eval()
    prompt = torch.tensor([[5, 17, 33, 8], [9, 60, 2, 41]])
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=8, do_sample=False).tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("mode", choices=["one", "two", "four"])
    cli = parser.parse_args()
    torch.set_num_threads(1)
    out, mode = cli.output_dir, cli.mode
    tp = {"one": {}, "two": {"tp": 2}, "four": {"tp": 2, "strategy": "fsdp", "batch_size": 2}}[mode]
    with process_group_from_env("gloo"):
        if mode == "four":
            train_lm(tiny_gpt2(), out / "gpt2-four", **tp)
            return
        if mode == "two":  # interrupted during step 3, after the sharded step-2 checkpoint, then resumed
            try:
                train_lm(tiny_gpt2(), out / "resumed-two", [Interrupt(2)], save_every=2, **tp)
            except Interrupted:
                pass
            train_lm(tiny_gpt2(), out / "resumed-two", save_every=2, **tp)
        else:  # 1 process continues the 2-process tensor-parallel step-2 checkpoint (resharding)
            checkpoint = out / "resumed-one" / "checkpoints" / "step-00000002"
            shutil.copytree(out / "resumed-two" / "checkpoints" / "step-00000002", checkpoint)
            train_lm(tiny_gpt2(), out / "resumed-one", save_every=2, strategy="fsdp")  # reads sharded checkpoints
        for name, settings in TP_PLUGINS.items():
            train_lm(tiny_gpt2(), out / f"gpt2-{name}-{mode}", **settings, **tp)
        tokens, local, vocab = {}, {}, {}  # generated tokens, this process's head counts and weight shapes
        lms = (("gpt2", tiny_gpt2), ("llama", tiny_llama), ("llama-tied", lambda: tiny_llama(tied=True)))
        for name, build in lms:
            model = train_lm(build(), out / f"{name}-{mode}", **tp)
            tokens[name] = generated(model)  # every process generates: the TP forwards are collectives
            attn, mlp = model.backbone.layers[0].attn, model.backbone.layers[0].mlp
            local[name] = {
                "heads": [attn.num_heads, attn.num_kv_heads],
                "q_proj": list(sharding.local_tensor(attn.q_proj.weight).shape),
                "k_proj": list(sharding.local_tensor(attn.k_proj.weight).shape),
                "out_proj": list(sharding.local_tensor(attn.out_proj.weight).shape),
                "fc_out": list(sharding.local_tensor(mlp.fc_out.weight).shape),
            }
            vocab[name] = vocabulary_split(model, model.head.lm_head.weight)
        rows, valid = classification_data(48, 0), classification_data(10, 1)
        trainer = Trainer(
            tiny_bert_classifier(), args(out / f"bert-{mode}", **tp), rows, valid, collate, objective=Classification()
        )
        trainer.fit()
        vocab["bert"] = vocabulary_split(trainer.unwrapped_model)
        rows, valid = mlm_data(48, 0), mlm_data(10, 1)
        run = args(out / f"bert-mlm-{mode}", **tp)
        trainer = Trainer(tiny_bert_mlm(), run, rows, valid, collate, objective=MaskedLM())
        trainer.fit()
        vocab["bert-mlm"] = vocabulary_split(trainer.unwrapped_model, trainer.unwrapped_model.head.mlm.bias)
        if is_main():
            (out / f"generate-{mode}.json").write_text(json.dumps(tokens))
            (out / f"local-{mode}.json").write_text(json.dumps(local))
            (out / f"vocab-{mode}.json").write_text(json.dumps(vocab))


def vocabulary_split(model, head=None) -> dict:
    """Every process's rows of the token table (and of the vocabulary ``head``'s weight or bias), whether the head's
    weight is the table's parameter itself, and the number of parameters the model holds."""
    table = model.get_input_embeddings().weight
    mine = [sharding.local_tensor(table).shape[0], None if head is None else sharding.local_tensor(head).shape[0]]
    everyone = [mine]
    if torch.distributed.is_initialized():
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, mine)
    return {
        "table_rows": [rows for rows, _ in everyone],
        "head_rows": [rows for _, rows in everyone],
        "tied": head is table,
        "parameters": len(list(model.parameters())),
    }


if __name__ == "__main__":
    main()
    fail_if_group_outlived()
