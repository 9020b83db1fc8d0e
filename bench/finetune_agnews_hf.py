"""AG News with plain ``transformers`` + a torch loop: the reference for ``recipes/finetune/agnews-minilm.yaml``.

Same data, labels (sorted names), hyperparameters (2 epochs, batch 32, AdamW lr 5e-5, weight decay 0.01 on
matrices, linear schedule with 10% warmup, max length 128, seed 0) and evaluation every epoch. Batches are
shuffled and dynamically padded (no length grouping). Usage:
``python -m bench.finetune_agnews_hf OUT_DIR [--device cuda] [--model DIR] [--data DIR]`` (defaults: CPU, the packaged
all-MiniLM-L6-v2, ``../shared/data/agnews``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path

import torch

from bunmyaku.hub.packaged import packaged_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "agnews"
EPOCHS, BATCH, LR, MAX_LEN, SEED, WARMUP = 2, 32, 5e-5, 128, 0, 0.1
logger = logging.getLogger("agnews-hf")


def read(path: Path) -> tuple[list[str], list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    return [r[0] for r in rows], [r[1] for r in rows]


@torch.no_grad()
def evaluate(model, tokenizer, texts, labels, device: str) -> float:
    model.eval()
    correct = 0
    for lo in range(0, len(texts), 128):
        batch = tokenizer(texts[lo : lo + 128], truncation=True, max_length=MAX_LEN, padding=True, return_tensors="pt")
        predicted = model(**batch.to(device)).logits.argmax(-1).cpu()
        correct += int((predicted == torch.tensor(labels[lo : lo + 128])).sum())
    model.train()
    return correct / len(texts)


def main(out_dir: str, device: str = "cpu", model_path: str | None = None, data: Path = DATA) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    train_texts, train_names = read(data / "dev.tsv")
    test_texts, test_names = read(data / "test.tsv")
    names = sorted(set(train_names))
    train_y, test_y = [names.index(n) for n in train_names], [names.index(n) for n in test_names]
    path = model_path or packaged_model("all-MiniLM-L6-v2")
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(names)).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0}], lr=LR
    )
    steps_per_epoch = len(train_texts) // BATCH
    schedule = get_linear_schedule_with_warmup(
        optimizer, round(WARMUP * EPOCHS * steps_per_epoch), EPOCHS * steps_per_epoch
    )
    generator = torch.Generator().manual_seed(SEED)
    history = []
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(train_texts), generator=generator).tolist()
        for step in range(steps_per_epoch):
            idx = order[step * BATCH : (step + 1) * BATCH]
            batch = tokenizer(
                [train_texts[i] for i in idx], truncation=True, max_length=MAX_LEN, padding=True, return_tensors="pt"
            )
            labels = torch.tensor([train_y[i] for i in idx])
            loss = model(**batch.to(device), labels=labels.to(device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            if step % 20 == 0:
                logger.info("epoch %d step %d/%d loss %.4f", epoch, step, steps_per_epoch, loss.item())
        accuracy = evaluate(model, tokenizer, test_texts, test_y, device)
        history.append({"epoch": epoch + 1, "accuracy": accuracy, "elapsed_s": time.perf_counter() - started})
        logger.info("epoch %d: test accuracy %.4f", epoch + 1, accuracy)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "accuracy": max(h["accuracy"] for h in history),
        "history": history,
        "wall_s": time.perf_counter() - started,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    logger.info("done: %s", result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", nargs="?", default="runs/finetune/agnews-hf")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="an all-MiniLM-L6-v2 folder; default: the packaged one")
    parser.add_argument("--data", type=Path, default=DATA, help="folder with dev.tsv and test.tsv")
    cli = parser.parse_args()
    main(cli.out_dir, cli.device, cli.model, cli.data)
