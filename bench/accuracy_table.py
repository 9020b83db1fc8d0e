"""The issue-16 accuracy table: k-fold CV of one English and one Japanese task, every training trick on the same
budget, seed averaging and the four ensembles; OOF metric, its mean and std over folds, and each row's cost
relative to the baseline.

Usage: ``python -m bench.accuracy_table WORK_DIR [--rows N] [--folds K] [--tasks agnews,jnli]``. The cost of
each row is one fold's training with its options, all rows timed back to back in one process (a seed average costs
its seeds' runs, an ensemble its inputs'). Runs go to
``WORK_DIR/<task>/<row>`` (fold models are deleted once a run's out-of-fold predictions are written; they are
large and the table needs only the predictions). A finished row is reused on a rerun. The summary is written to
``bench/results/accuracy-table.json`` and ``.md``.

Tasks (from ``../shared/data``): AG News (the first N rows of ``dev.tsv``; no train split here) with the packaged
all-MiniLM-L6-v2, and JGLUE JNLI (the first N rows of ``valid.jsonl``; no train split here) with
``models/bunmyaku-bert-ja-small``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from bench.machine import describe
from bunmyaku.hub.files import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"
logger = logging.getLogger("accuracy-table")

# Each task: how to read it, its model and its baseline recipe (one budget for every row).
TASKS = {
    "agnews": {
        "title": "AG News (English, 4 topics)",
        "file": DATA / "agnews" / "dev.tsv",
        "model": "minilm",
        "options": dict(
            task="text-classification",
            text_column="0",
            label_column="1",
            format="tsv",
            epochs=2,
            batch_size=16,
            lr=1e-4,
            max_length=64,
        ),
        "metric": "accuracy",
    },
    "jnli": {
        "title": "JGLUE JNLI (Japanese NLI, 3 labels)",
        "file": DATA / "jglue" / "jnli" / "valid.jsonl",
        "model": str(ROOT / "models" / "bunmyaku-bert-ja-small"),
        "options": dict(
            task="text-classification",
            text_column="sentence1",
            text_pair_column="sentence2",
            label_column="label",
            epochs=3,
            batch_size=16,
            lr=2e-4,
            max_length=96,
        ),
        "metric": "accuracy",
    },
}

# The rows: a name, the options added to the baseline's, and what the table says.
TRICKS = [
    ("baseline", {}, "baseline"),
    ("llrd", {"llrd": 0.8}, "+ LLRD 0.8"),
    ("fgm", {"fgm": 1.0}, "+ FGM eps 1.0"),
    ("awp", {"awp_lr": 1.0, "awp_eps": 0.01, "awp_start_epoch": 1}, "+ AWP lr 1, eps 0.01, from epoch 1"),
    ("sam", {"sam": 0.05}, "+ SAM rho 0.05"),
    ("ema", {"ema_decay": 0.95}, "+ EMA 0.95"),
    ("seeds3", {"seeds": "0,1,2"}, "seed average of 3 (0, 1, 2)"),
]
SINGLE = ["baseline", "llrd", "fgm", "awp", "sam", "ema"]


def read_rows(task: str, n: int) -> list[dict]:
    spec = TASKS[task]
    lines = spec["file"].read_text(encoding="utf-8").splitlines()[:n]
    if task == "agnews":
        rows = [line.split("\t") for line in lines]
        return [{"0": r[0], "1": r[1]} for r in rows]
    return [json.loads(line) for line in lines]


def model_path(task: str) -> str:
    name = TASKS[task]["model"]
    if name == "minilm":
        from bunmyaku.hub.packaged import packaged_model

        return str(packaged_model("all-MiniLM-L6-v2"))
    return name


def run_row(task: str, name: str, extra: dict, rows: list[dict], folds: int, work: Path) -> dict:
    """One cv run (reused when finished earlier); its OOF metrics, per-fold mean / std and wall time."""
    import bunmyaku

    out = work / task / name
    done = out / "bench.json"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    options = dict(TASKS[task]["options"])
    if task == "agnews":  # in-memory rows carry string keys "0", "1"
        options.update(format="auto")
    options.update(extra)
    start = time.perf_counter()
    result = bunmyaku.cv(
        model=model_path(task), train=rows, folds=folds, fold_seed=0, output_dir=str(out), overwrite=True, **options
    )
    seconds = time.perf_counter() - start
    for model_dir in out.glob("fold*/**/model"):
        shutil.rmtree(model_dir)
    for ckpt in out.glob("fold*/**/checkpoints"):
        shutil.rmtree(ckpt)
    summary = {
        "metrics": result.metrics,
        "fold_mean": result.fold_metrics["mean"],
        "fold_std": result.fold_metrics["std"],
        "seconds": seconds,
    }
    write_json_atomic(done, summary)
    return summary


def time_row(task: str, name: str, extra: dict, rows: list[dict], work: Path) -> float:
    """Seconds of one fine-tuning run with this row's options on the first 4/5 of the rows, evaluated on the rest:
    the cost measured for every row back to back in one process, so the ratios compare like with like (the cv runs
    above may share the machine with other work). A seed average costs its seeds' runs."""
    import bunmyaku

    done = work / task / f"timing-{name}.json"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))["seconds"]
    options = dict(TASKS[task]["options"])
    if task == "agnews":
        options.update(format="auto")
    options.update({k: v for k, v in extra.items() if k != "seeds"})
    cut = len(rows) * 4 // 5
    start = time.perf_counter()
    bunmyaku.finetune(
        model=model_path(task),
        train=rows[:cut],
        eval=rows[cut:],
        output_dir=str(work / task / f"timing-{name}"),
        overwrite=True,
        progress=False,
        plot=False,
        **options,
    )
    seconds = (time.perf_counter() - start) * len(str(extra.get("seeds", "0")).split(","))
    shutil.rmtree(work / task / f"timing-{name}")
    write_json_atomic(done, {"seconds": seconds})
    return seconds


def run_ensembles(task: str, work: Path, singles: dict) -> dict:
    from bunmyaku.tasks.ensemble import ensemble

    metric = TASKS[task]["metric"]
    others = [n for n in SINGLE if n != "baseline"]
    best_other = max(others, key=lambda n: singles[n]["metrics"][metric])
    plans = {
        f"mean of baseline and {best_other}": ("mean", None, ["baseline", best_other]),
        "mean of the 6 single runs": ("mean", None, SINGLE),
        "rank average of the 6": ("rank", None, SINGLE),
        "weighted (nested) of the 6": ("weighted", None, SINGLE),
        "stacking, logistic (nested) of the 6": ("stacking", "logistic", SINGLE),
    }
    rows = {}
    for label, (method, meta, names) in plans.items():
        out = work / task / f"ens-{method}-{len(names)}"
        start = time.perf_counter()
        result = ensemble([work / task / n for n in names], out, method=method, meta=meta)
        seconds = time.perf_counter() - start + sum(singles[n]["seconds"] for n in names)
        cost = sum(singles[n]["cost"] for n in names)
        rows[label] = {
            "cost": cost,
            "metrics": result.metrics,
            "fold_mean": _fold_mean(result),
            "fold_std": _fold_std(result),
            "seconds": seconds,
            "weights": getattr(result, "weights", None),
        }
    return rows


def _per_fold(result) -> list[dict]:
    folds = result.fold_metrics
    return folds["folds"] if isinstance(folds, dict) else list(folds)


def _fold_mean(result) -> dict:
    folds = _per_fold(result)
    return {k: float(np.mean([f[k] for f in folds])) for k in ("accuracy", "f1") if k in folds[0]}


def _fold_std(result) -> dict:
    folds = _per_fold(result)
    return {k: float(np.std([f[k] for f in folds])) for k in ("accuracy", "f1") if k in folds[0]}


def _cell(summary: dict, key: str) -> str:
    value = summary["metrics"].get(key)
    mean, std = summary.get("fold_mean", {}).get(key), summary.get("fold_std", {}).get(key)
    text = "n/a" if value is None else f"{value:.4f}"
    if mean is not None and std is not None:
        text += f" ({mean:.4f} ± {std:.4f})"
    return text


def table(task: str, rows: dict, n: int, folds: int) -> str:
    spec = TASKS[task]
    base = rows["baseline"]["cost"]
    lines = [
        f"### {spec['title']}: {n} rows, {folds}-fold CV",
        "",
        "| row | OOF accuracy (fold mean ± std) | OOF macro F1 (fold mean ± std) | cost: one fold's training | "
        "vs baseline |",
        "|---|---|---|---:|---:|",
    ]
    for label, summary in rows.items():
        cost = summary["cost"]
        lines.append(
            f"| {label} | {_cell(summary, 'accuracy')} | {_cell(summary, 'f1')} | {cost:.0f} s | {cost / base:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--tasks", default="agnews,jnli")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    report = {"machine": describe(), "rows": args.rows, "folds": args.folds, "tasks": {}}
    sections = []
    for task in args.tasks.split(","):
        data = read_rows(task, args.rows)
        # warm-up (imports, first allocations) so the baseline's time is not charged with them
        run_row(task, "warmup", {"epochs": 0.1}, data[:40], 2, args.work)
        rows = {}
        for name, extra, label in TRICKS:
            logger.info("%s: %s", task, label)
            rows[label] = run_row(task, name, extra, data, args.folds, args.work)
        if not all((args.work / task / f"timing-{name}.json").is_file() for name, _, _ in TRICKS):
            time_row(task, "warmup", {"epochs": 0.1}, data[:40], args.work)  # imports and first allocations
        for name, extra, label in TRICKS:  # the costs, back to back once the cv runs are done
            rows[label]["cost"] = time_row(task, name, extra, data, args.work)
        singles = {name: rows[label] for name, _, label in TRICKS}
        rows.update(run_ensembles(task, args.work, singles))
        report["tasks"][task] = rows
        sections.append(table(task, rows, len(data), args.folds))
        write_json_atomic(RESULTS / "accuracy-table.json", report, sort_keys=False)
        text = f"Machine: {report['machine']}\n\n" + "\n\n".join(sections) + "\n"
        write_text_atomic(RESULTS / "accuracy-table.md", text)
        print(sections[-1], flush=True)


if __name__ == "__main__":
    main()
