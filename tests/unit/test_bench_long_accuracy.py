"""bench/long_accuracy.py's bookkeeping (no training): the stratified split, the rows it runs and what it writes."""

from __future__ import annotations

import json
from argparse import Namespace
from collections import Counter

import pytest

import bench.long_accuracy as long_accuracy


def _rows(per_label: dict[str, int]) -> list[dict]:
    return [{"text": f"{label}-{i}", "label": label} for label, n in per_label.items() for i in range(n)]


def test_split_is_stratified_disjoint_and_seeded():
    rows = _rows({"a": 7, "b": 5, "c": 9})
    counts = {"train": 2, "dev": 1, "test": 2}
    splits = long_accuracy.stratified_split(rows, counts, seed=3)
    for name, n in counts.items():
        assert Counter(r["label"] for r in splits[name]) == {"a": n, "b": n, "c": n}
    texts = [r["text"] for part in splits.values() for r in part]
    assert len(texts) == len(set(texts)) == 15  # no article in two splits
    again = long_accuracy.stratified_split(rows, counts, seed=3)
    assert [r["text"] for r in again["test"]] == [r["text"] for r in splits["test"]]
    others = [long_accuracy.stratified_split(rows, counts, seed=s)["train"] for s in range(4, 9)]
    assert any({r["text"] for r in o} != {r["text"] for r in splits["train"]} for o in others)
    # labels interleaved, not one block per label
    assert [r["label"] for r in splits["test"]] != sorted(r["label"] for r in splits["test"])


def test_split_refuses_a_label_too_small_for_the_counts():
    with pytest.raises(ValueError, match="label 'b' has 4 rows; the split needs 5"):
        long_accuracy.stratified_split(_rows({"a": 9, "b": 4}), {"train": 3, "test": 2})


def test_table_runs_every_row_on_one_budget_and_writes_results(tmp_path, monkeypatch):
    monkeypatch.setattr(long_accuracy, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(long_accuracy, "read_livedoor", lambda work: _rows({"x": 6, "y": 6}))
    long_text = ("0", "1")  # texts ending in these are 300 tokens long, the others 100
    monkeypatch.setattr(long_accuracy, "token_lengths", lambda ts: [300 if t.endswith(long_text) else 100 for t in ts])
    monkeypatch.setattr(long_accuracy, "describe", lambda: "test machine")
    long_dir = tmp_path / "long"
    info = {"path": str(long_dir)}
    fake_long = lambda work, splits, n, w, s, t=None: (long_dir, {**info, "window": w})  # noqa: E731
    monkeypatch.setattr(long_accuracy, "long_model", fake_long)
    calls = []

    def fake_row(name, options, splits, work, model):
        calls.append((name, options, model, {k: len(v) for k, v in splits.items()}))
        return {"test": {"accuracy": 0.5, "f1": 0.25}, "dev": {"accuracy": None, "f1": None}, "best_epoch": 2.0,
                "seconds": 10.0 * len(calls), "cpu_seconds": 5.0 * len(calls), "options": options}  # fmt: skip

    args = Namespace(work=tmp_path / "work", train_per_class=2, dev_per_class=1, test_per_class=3, seed=0,
                     max_length=256, long_length=2048, mlm_steps=0, trained_length=None, results=None,
                     only="")  # fmt: skip
    report = long_accuracy.run_table(args, finetune_row=fake_row)

    names = [c[0] for c in calls]
    assert names == ["truncate", "head-tail", "windows-mean", "windows-max", "windows-attention", "longified"]
    assert all(c[3] == {"train": 4, "dev": 2, "test": 6} for c in calls)
    options = {c[0]: c[1] for c in calls}
    assert options["head-tail"] == {"long_strategy": "head-tail", "head_tokens": 64, "max_length": 256}
    poolings = ("mean", "max", "attention")
    assert [options[f"windows-{p}"]["window_pooling"] for p in poolings] == list(poolings)
    assert all(options[f"windows-{p}"]["stride"] == 64 for p in poolings)
    assert options["longified"] == {"long_strategy": "truncate", "max_length": 2048}
    assert calls[-1][2] == long_dir and all(c[2] == long_accuracy.MODEL for c in calls[:-1])
    assert report["long_model"]["window"] == 256  # the long model's window is the other rows' max_length
    split = long_accuracy.stratified_split(_rows({"x": 6, "y": 6}), {"train": 2, "dev": 1, "test": 3})
    long_share = sum(r["text"].endswith(long_text) for r in split["test"]) / 6
    assert report["test_lengths"]["share_over"]["256"] == pytest.approx(long_share)
    assert report["test_lengths"]["share_over"]["2048"] == 0.0

    saved = json.loads((tmp_path / "results" / "long-accuracy.json").read_text())
    assert list(saved["rows"]) == names and saved["split"]["sizes"] == {"train": 4, "dev": 2, "test": 6}
    md = (tmp_path / "results" / "long-accuracy.md").read_text()
    assert md.startswith("Machine: test machine")
    assert "| windows of 256, stride 64, attention pooling | 0.5000 | 0.2500 | n/a (2.0) | 50 s | 25 s | 5.00x |" in md
    assert "longified to 2048, window 256, no further pretraining" in md

    # --only: just those rows, and the results files are left to a plain rerun
    calls.clear()
    (tmp_path / "results" / "long-accuracy.md").unlink()
    report = long_accuracy.run_table(Namespace(**{**vars(args), "only": "head-tail,longified"}), finetune_row=fake_row)
    assert [c[0] for c in calls] == ["head-tail", "longified"] and list(report["rows"]) == ["head-tail", "longified"]
    assert not (tmp_path / "results" / "long-accuracy.md").exists()
    # --only with --results: those rows, written under that name
    report = long_accuracy.run_table(
        Namespace(**{**vars(args), "only": "longified", "results": "long-mlm"}), finetune_row=fake_row
    )
    assert list(json.loads((tmp_path / "results" / "long-mlm.json").read_text())["rows"]) == ["longified"]
    assert not (tmp_path / "results" / "long-accuracy.md").exists()


def test_a_finished_row_is_reused_without_training(tmp_path, monkeypatch):
    import bunmyaku

    stored = {"test": {"accuracy": 0.9, "f1": 0.8}, "seconds": 1.0}
    (tmp_path / "truncate").mkdir()
    (tmp_path / "truncate" / "bench.json").write_text(json.dumps(stored))

    def refuse(**options):
        raise AssertionError("a finished row must not train again")

    monkeypatch.setattr(bunmyaku, "finetune", refuse)
    assert long_accuracy.run_row("truncate", {}, {}, tmp_path, "model") == stored
    with pytest.raises(AssertionError, match="must not train"):
        long_accuracy.run_row("head-tail", {}, {"train": [], "dev": [], "test": []}, tmp_path, "model")
