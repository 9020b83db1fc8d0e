"""Checks every cv task family's tests share: the oof.jsonl contract, group folds, ensembles of one run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

FAST = {
    "epochs": 3,
    "batch_size": 4,
    "max_length": 32,
    "lr": 3e-3,
    "progress": False,
    "plot": False,
    "device": "cpu",
    "log_every": 1000,
}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_rows_and_folds(out, n, folds=2):
    """Every training row exactly once, in file order; each row in one fold, every fold used; each fold's run
    evaluated on exactly its held-out rows. Returns the oof records."""
    oof = read_jsonl(out / "oof.jsonl")
    assert [r["row"] for r in oof] == list(range(n))
    assert {r["fold"] for r in oof} == set(range(folds))
    settings = json.loads((out / "cv.json").read_text())
    assert settings["folds"] == [r["fold"] for r in oof]  # the folds cv drew are the ones recorded per row
    for k in range(folds):
        held = sum(r["fold"] == k for r in oof)
        for metrics in (out / f"fold{k}").glob("**/metrics.json"):
            written = json.loads(metrics.read_text())
            assert written["eval_examples"] == held and written["train_examples"] == n - held  # disjoint
    return oof


def check_groups_kept(oof, groups):
    """No group is split between folds."""
    by_group = {}
    for record, group in zip(oof, groups, strict=True):
        by_group.setdefault(group, set()).add(record["fold"])
    assert len(by_group) > 2 and all(len(f) == 1 for f in by_group.values())


def check_fold_metrics(out, metric_of_rows):
    """fold_metrics.json holds each fold's metrics on its held-out oof rows, and their mean and std."""
    oof = read_jsonl(out / "oof.jsonl")
    summary = json.loads((out / "fold_metrics.json").read_text())
    for k, entry in enumerate(summary["folds"]):
        held = [r for r in oof if r["fold"] == k]
        assert entry["examples"] == len(held)
        for key, value in metric_of_rows(held).items():
            assert entry[key] == pytest.approx(value, abs=1e-9), key
    for key in metric_of_rows(oof):
        values = [f[key] for f in summary["folds"]]
        assert summary["mean"][key] == pytest.approx(np.mean(values)) and summary["std"][key] == pytest.approx(
            np.std(values)
        )


def assert_same(a, b, where=()):
    """Equal JSON values, numbers to 1e-9 at any depth."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], (*where, key))
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, (*where, i))
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-9), where
    else:
        assert a == b, where


def check_ensemble_of_one_run(out, tmp_path, methods=("mean",)):
    """An ensemble of a run with itself is that run: the same oof scores, predictions and metrics."""
    from bunmyaku.tasks.ensemble import ensemble

    run = read_jsonl(out / "oof.jsonl")
    for method in methods:
        target = tmp_path / f"ensemble-{method}"
        result = ensemble([out, out], target, method=method)
        combined = read_jsonl(target / "oof.jsonl")
        assert len(combined) == len(run)
        for a, b in zip(combined, run, strict=True):
            for key in set(a) | set(b):
                if key == "choice":  # multiple choice: the ensemble has no choice texts to name
                    continue
                assert_same(a[key], b[key], (method, key))
        metrics = json.loads((out / "metrics.json").read_text())
        for key, value in metrics.items():
            assert result.metrics[key] == pytest.approx(value, abs=1e-9), (method, key)
        assert json.loads((target / "metrics.json").read_text()) == result.metrics


def check_mismatched_runs_refused(out, other_family, tmp_path):
    """A run whose folds differ, and a run of another task family (``other_family``; None: this run's records
    under another task's cv.json), are refused."""
    from bunmyaku.tasks.ensemble import ensemble

    if other_family is None:
        other_family = tmp_path / "other-task"
        shutil.copytree(out, other_family, ignore=shutil.ignore_patterns("fold*"))
        settings = json.loads((out / "cv.json").read_text())
        settings["finetune"]["task"] = "multiple-choice"
        (other_family / "cv.json").write_text(json.dumps(settings))

    moved = tmp_path / "moved-fold"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns("fold*"))
    records = read_jsonl(moved / "oof.jsonl")
    records[0]["fold"] = 1 - records[0]["fold"]
    (moved / "oof.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match="do not share the folds: row 0"):
        ensemble([out, moved], tmp_path / "e1")
    with pytest.raises(ValueError, match="different task families"):
        ensemble([out, other_family], tmp_path / "e2")
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e2").exists()


def ensemble_with_changed_copy(out, tmp_path, change):
    """``ensemble --method mean`` of the run and a copy of it whose oof scores went through ``change``; returns
    (the run's records, the copy's, the ensemble's)."""
    from bunmyaku.tasks.ensemble import ensemble

    other = tmp_path / "changed"
    shutil.copytree(out, other, ignore=shutil.ignore_patterns("*.safetensors", "checkpoints"))
    changed = [{**r, "scores": change(r["scores"])} for r in read_jsonl(out / "oof.jsonl")]
    (other / "oof.jsonl").write_text("".join(json.dumps(r) + "\n" for r in changed))
    ensemble([out, other], tmp_path / "mean-of-two", method="mean")
    return read_jsonl(out / "oof.jsonl"), changed, read_jsonl(tmp_path / "mean-of-two" / "oof.jsonl")
