"""The issue-18 accuracy table on real long documents: livedoor news (9 categories, title + body, most articles
longer than the model's window), classified with the same fine-tuning budget by each way of handling a long text:
truncate, head-tail, sliding windows pooled by mean / max / learned attention, and the same BERT longified into a
Longformer that reads (nearly) the whole article.

Usage: ``python -m bench.long_accuracy WORK_DIR [--train-per-class N] [--dev-per-class D] [--test-per-class M]
[--max-length L] [--long-length LL] [--mlm-steps S] [--epochs E] [--lr LR] [--only ROWS]``.

The split is seeded and stratified (:func:`stratified_split`): within each category the articles are shuffled by
``numpy.random.default_rng(seed)`` and the first N go to train, the next D to dev (picks the best epoch), the next
M to test, so every category has the same counts. Every row trains ``models/bunmyaku-bert-ja-small`` with the same
epochs, learning rate, batch size and seed; windows overlap by ``L // 4`` tokens and head-tail keeps ``L // 4``
head tokens (Sun et al. 2019 keep 128 of 512). The longified row is ``bunmyaku longify`` to ``LL`` tokens with a
two-sided window of ``L`` (each token sees as much context as in an ``L``-token window), then, with
``--mlm-steps S > 0``, MLM pretraining continued for S steps on the train split's texts only (the Longformer paper's
recipe, much shortened), then fine-tuned with truncate at ``LL``.

Runs go to ``WORK_DIR/<row>``; a row's model folder is deleted once its test metrics are written. A finished row
is reused on a rerun. The summary is written to ``bench/results/long-accuracy.json`` and ``.md`` (or the
``--results`` name).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import lzma
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import at_least
from bench.accuracy_table import DATA, RESULTS, ROOT
from bench.machine import describe
from bunmyaku.data.tables import iter_jsonl
from bunmyaku.hub.files import write_json_atomic, write_jsonl_atomic, write_text_atomic

SOURCE = DATA / "livedoor" / "livedoor.jsonl.xz"
MODEL = ROOT / "models" / "bunmyaku-bert-ja-small"
logger = logging.getLogger("long-accuracy")

# One budget for every row.
BUDGET = dict(task="text-classification", epochs=2, batch_size=4, lr=2e-4, seed=0)


def rows_for(max_length: int) -> list[tuple[str, dict[str, Any], str]]:
    """The table's rows for a window of ``max_length`` tokens: (name, finetune options, label)."""
    quarter = max_length // 4
    windows = dict(long_strategy="windows", stride=quarter, max_length=max_length)
    return [
        ("truncate", dict(long_strategy="truncate", max_length=max_length), f"truncate (first {max_length} tokens)"),
        (
            "head-tail",
            dict(long_strategy="head-tail", head_tokens=quarter, max_length=max_length),
            f"head-tail ({quarter} head + {max_length - quarter - 2} tail tokens)",
        ),
        ("windows-mean", {**windows, "window_pooling": "mean"}, f"windows of {max_length}, stride {quarter}, mean"),
        ("windows-max", {**windows, "window_pooling": "max"}, f"windows of {max_length}, stride {quarter}, max"),
        (
            "windows-attention",
            {**windows, "window_pooling": "attention"},
            f"windows of {max_length}, stride {quarter}, attention pooling",
        ),
    ]


def read_livedoor(work: Path) -> list[dict[str, str]]:
    """The articles as ``{"text": title + newline + body, "label": category}``, in file order (decompressed into
    ``work`` once, then read with the project's JSONL reader)."""
    plain = work / "livedoor.jsonl"
    if not plain.is_file():
        if not SOURCE.is_file():
            raise FileNotFoundError(f"{SOURCE} does not exist: the livedoor corpus (see {DATA / 'README.md'})")
        with lzma.open(SOURCE, "rt", encoding="utf-8") as f:
            write_text_atomic(plain, f.read())
    rows = []
    for number, record in iter_jsonl(plain):
        for key in ("title", "body", "label"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"{plain}:{number}: expected a string field {key!r}")
        rows.append({"text": record["title"] + "\n" + record["body"], "label": record["label"]})
    return rows


def stratified_split(
    rows: list[dict[str, Any]], counts: dict[str, int], seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """Split ``rows`` per label: each label's rows are shuffled by ``numpy.random.default_rng(seed)`` (labels in
    sorted order, one generator) and dealt out in the order of ``counts`` ({split name: rows per label}).
    Each split is returned in a seeded shuffled order (labels interleaved).

    Raises:
        ValueError: a label has fewer rows than the splits need together.
    """
    by_label: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    need = sum(counts.values())
    rng = np.random.default_rng(seed)
    splits: dict[str, list[dict[str, Any]]] = {name: [] for name in counts}
    for label in sorted(by_label):
        group = by_label[label]
        if len(group) < need:
            raise ValueError(f"label {label!r} has {len(group)} rows; the split needs {need} per label ({counts})")
        order = rng.permutation(len(group))
        start = 0
        for name, n in counts.items():
            splits[name].extend(group[i] for i in order[start : start + n])
            start += n
    for name, part in splits.items():
        splits[name] = [part[i] for i in rng.permutation(len(part))]
    return splits


def token_lengths(texts: list[str]) -> list[int]:
    """Tokens per text with bert-ja-small's tokenizer, special tokens included, no truncation."""
    from bunmyaku import Tokenizer

    tokenizer = Tokenizer.from_pretrained(str(MODEL))
    return [len(ids) for ids in tokenizer(texts)["input_ids"]]


def run_row(name: str, options: dict[str, Any], splits: dict[str, list], work: Path, model: str | Path) -> dict:
    """One fine-tuning run (reused when finished earlier): its test metrics, best epoch and wall time."""
    import bunmyaku

    out = work / name
    done = out / "bench.json"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    start, cpu = time.perf_counter(), time.process_time()
    result = bunmyaku.finetune(
        model=str(model),
        train=splits["train"],
        eval=splits["dev"],
        test=splits["test"],
        output_dir=str(out),
        overwrite=True,
        progress=False,
        plot=False,
        **{**BUDGET, **options},
    )
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    test = result.metrics["test"]
    summary = {
        "test": {"accuracy": test["accuracy"], "f1": test["f1"]},
        "dev": {"accuracy": result.metrics.get("accuracy"), "f1": result.metrics.get("f1")},
        "best_epoch": result.metrics.get("epoch"),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "options": options,
    }
    for folder in ("model", "checkpoints"):
        shutil.rmtree(out / folder, ignore_errors=True)
    write_json_atomic(done, summary)
    return summary


def long_model(
    work: Path,
    splits: dict[str, list],
    long_length: int,
    window: int,
    mlm_steps: int,
    trained_length: int | None = None,
) -> tuple[Path, dict]:
    """The longified bert-ja-small (reused when built earlier; only its first ``trained_length`` positions copied
    when given), MLM-pretrained for ``mlm_steps`` steps on the train split's texts when that is above 0; the folder
    and what it cost."""
    import bunmyaku
    from bunmyaku.models.longify import longify

    done = work / "long-model.json"
    if done.is_file():
        info = json.loads(done.read_text(encoding="utf-8"))
        return Path(info["path"]), info
    start = time.perf_counter()
    path = longify(MODEL, work / "long-model", long_length, window, overwrite=True, trained_length=trained_length)
    info: dict[str, Any] = {
        "longify_seconds": time.perf_counter() - start,
        "mlm_steps": mlm_steps,
        "trained_length": trained_length,
    }
    if mlm_steps > 0:
        texts = work / "mlm-train.jsonl"
        write_jsonl_atomic(texts, [{"text": row["text"]} for row in splits["train"]])
        start = time.perf_counter()
        result = bunmyaku.pretrain(
            objective="mlm",
            init_from=str(path),
            data=[str(texts)],
            output_dir=str(work / "long-model-mlm"),
            block_size=long_length,
            max_steps=mlm_steps,
            batch_size=BUDGET["batch_size"] // 2,
            lr=1e-4,
            warmup_steps=max(1, mlm_steps // 10),
            valid_fraction=0.05,
            eval_every=mlm_steps,
            save_every=mlm_steps,
            seed=BUDGET["seed"],
            progress=False,
            plot=False,
        )
        info.update(mlm_seconds=time.perf_counter() - start, mlm_metrics=result.metrics)
        path = result.output_dir
    info["path"] = str(path)
    write_json_atomic(done, info)
    return path, info


def table(rows: dict[str, dict], labels: dict[str, str]) -> str:
    """The Markdown table: test accuracy and macro F1, dev accuracy at the best epoch, wall time and CPU time
    (the process's, all threads: the measure that does not depend on what else shares the machine), per row."""
    base = rows["truncate"]["cpu_seconds"] if "truncate" in rows else None
    lines = [
        "| row | test accuracy | test macro F1 | dev accuracy (best epoch) | wall time | CPU time | CPU vs truncate |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, summary in rows.items():
        dev = summary["dev"]["accuracy"]
        ratio = f"{summary['cpu_seconds'] / base:.2f}x" if base else "n/a"
        lines.append(
            f"| {labels[name]} | {summary['test']['accuracy']:.4f} | {summary['test']['f1']:.4f} | "
            f"{'n/a' if dev is None else f'{dev:.4f}'} ({summary['best_epoch']}) | {summary['seconds']:.0f} s | "
            f"{summary['cpu_seconds']:.0f} s | {ratio} |"
        )
    return "\n".join(lines)


def length_summary(lengths: list[int], limits: list[int]) -> dict[str, Any]:
    """Median and percentiles of ``lengths`` and the share above each of ``limits``."""
    array = np.asarray(lengths)
    return {
        "median": float(np.median(array)),
        "p90": float(np.percentile(array, 90)),
        "max": int(array.max()),
        "share_over": {str(limit): float((array > limit).mean()) for limit in limits},
    }


def run_table(args: argparse.Namespace, finetune_row: Callable[..., dict] = run_row) -> dict[str, Any]:
    """Split, measure lengths, run every row (reusing finished ones), write the results; returns the report."""
    args.work.mkdir(parents=True, exist_ok=True)
    counts = {"train": args.train_per_class, "dev": args.dev_per_class, "test": args.test_per_class}
    splits = stratified_split(read_livedoor(args.work), counts, seed=args.seed)
    limits = [args.max_length, 512, args.long_length]
    report: dict[str, Any] = {
        "machine": describe(),
        "budget": BUDGET,
        "split": {"seed": args.seed, "per_class": counts, "sizes": {k: len(v) for k, v in splits.items()}},
        "max_length": args.max_length,
        "long_length": args.long_length,
        "test_lengths": length_summary(token_lengths([r["text"] for r in splits["test"]]), limits),
        "rows": {},
    }
    only = set(args.only.split(",")) if args.only else None
    stem = args.results
    if only is None or stem:  # an --only run without --results leaves the files to a plain rerun
        save = functools.partial(_write, stem=stem or "long-accuracy")
    else:
        save = lambda report, labels: report.update(labels=labels)  # noqa: E731
    labels = {}
    for name, options, label in rows_for(args.max_length):
        if only is not None and name not in only:
            continue
        logger.info("row %s", label)
        labels[name] = label
        report["rows"][name] = finetune_row(name, options, splits, args.work, MODEL)
        save(report, labels)
    if args.long_length and (only is None or "longified" in only):
        trained = args.trained_length
        path, info = long_model(args.work, splits, args.long_length, args.max_length, args.mlm_steps, trained)
        report["long_model"] = info
        label = f"longified to {args.long_length}, window {args.max_length}, " + (
            f"+ {args.mlm_steps} MLM steps on train" if args.mlm_steps else "no further pretraining"
        )
        if trained:
            label += f", positions 0-{trained - 1} copied"
        logger.info("row %s", label)
        labels["longified"] = label
        options = dict(long_strategy="truncate", max_length=args.long_length)
        report["rows"]["longified"] = finetune_row("longified", options, splits, args.work, path)
        save(report, labels)
    return report


def _write(report: dict[str, Any], labels: dict[str, str], stem: str) -> None:
    report["labels"] = labels
    write_json_atomic(RESULTS / f"{stem}.json", report, sort_keys=False)
    text = f"Machine: {report['machine']}\n\n{table(report['rows'], labels)}\n"
    write_text_atomic(RESULTS / f"{stem}.md", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--train-per-class", type=at_least(1), default=30)
    parser.add_argument("--dev-per-class", type=at_least(1), default=5)
    parser.add_argument("--test-per-class", type=at_least(1), default=30)
    parser.add_argument("--max-length", type=at_least(8), default=256, help="tokens per input (per window)")
    parser.add_argument("--long-length", type=at_least(0), default=2048, help="longified length (0: no row)")
    parser.add_argument("--mlm-steps", type=at_least(0), default=0, help="MLM steps on the train texts after longify")
    parser.add_argument(
        "--trained-length",
        type=at_least(1),
        default=None,
        help="longify copies only the model's first N positions (bert-ja-small was pretrained at 128 tokens)",
    )
    parser.add_argument("--epochs", type=at_least(0.01, float), default=BUDGET["epochs"], help="every row's epochs")
    parser.add_argument("--lr", type=at_least(1e-12, float), default=BUDGET["lr"], help="every row's peak lr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated rows to run (truncate, head-tail, windows-mean, windows-max, windows-attention, "
        "longified), e.g. in a second process; such a run writes no results (a plain rerun gathers the finished "
        "rows) unless --results names them",
    )
    parser.add_argument(
        "--results",
        default=None,
        help="the results files' name in bench/results/ (default long-accuracy); also written by an --only run",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    BUDGET.update(epochs=args.epochs, lr=args.lr)
    report = run_table(args)
    print(table(report["rows"], report["labels"]), flush=True)


if __name__ == "__main__":
    main()
