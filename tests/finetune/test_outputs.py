"""A fine-tuning run owns its output folder: a lock, no mixing with an earlier run's results, atomic writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bunmyaku.tasks.classification import TextClassification
from bunmyaku.tasks.finetune import TaskEvaluator, evaluate_file, predict_file
from bunmyaku.training.outputs import LOCK_NAME, OutputDirBusy, is_locked
from tests.finetune.helpers import finetune, sentiment_rows, write_tsv

HOLDER = """
import sys, time
from bunmyaku.training.outputs import exclusive_output_dir
with exclusive_output_dir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""
STALE = {
    "metrics.json": '{"accuracy": 0.99, "train_examples": 12345}',
    "predictions.jsonl": '{"label": "stale"}\n',
    "metrics.jsonl": '{"step": 1, "loss": 9.9}\n',
    "finetune.log": "OLD LOG LINE\n",
    "loss_curves.png": "not a png",
    ".metrics.json.abc123.tmp": "a killed run's partial file",
    "model/config.json": '{"model_type": "stale"}',
    "model/model.safetensors": "stale weights",
    "checkpoints/step-5/state.json": "{}",
}


@pytest.fixture
def data(tmp_path):
    return write_tsv(tmp_path / "d.tsv", sentiment_rows(8))


def quick(out, model, data, **settings):
    """One epoch of text classification on 8 rows."""
    columns = {"text_column": "0", "label_column": "1"}
    common = {"task": "text-classification", "model": str(model), "train": str(data), "eval": str(data)}
    return finetune(out, **{**common, **columns, "epochs": 1, **settings})


def plant(out):
    """The results of an earlier run, and a file of the user's own."""
    for name, text in STALE.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    (out / "notes.txt").write_text("mine")
    return out


@pytest.fixture
def holder(tmp_path):
    """A second process holding the lock of tmp_path / "held"."""
    out = tmp_path / "held"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield out, proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_run_refuses_a_folder_another_process_writes_into(holder, tiny_bert_dir, data):
    out, pid = holder
    with pytest.raises(OutputDirBusy, match=f"pid {pid}"):
        quick(out, tiny_bert_dir, data)
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # the refused run wrote nothing, not even its log


def test_the_lock_is_held_for_the_whole_run(tmp_path, tiny_bert_dir, data, monkeypatch):
    out = tmp_path / "run"
    seen = []
    original = TaskEvaluator.__call__

    def spy(self, trainer):
        seen.append(is_locked(out))  # another open file description: flock conflicts even in this process
        return original(self, trainer)

    monkeypatch.setattr(TaskEvaluator, "__call__", spy)
    quick(out, tiny_bert_dir, data, epochs=2)
    assert seen == [True, True] and not is_locked(out)


def test_a_non_empty_folder_is_refused_naming_overwrite(tmp_path, tiny_bert_dir, data):
    out = plant(tmp_path / "run")
    with pytest.raises(ValueError, match=r"already holds .*metrics.json.*; pass --overwrite"):
        quick(out, tiny_bert_dir, data)
    for name, text in STALE.items():  # untouched: the log not truncated, nothing cleared
        assert (out / name).read_text() == text, name
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")  # any file makes a folder somebody's
    with pytest.raises(ValueError, match="notes.txt"):
        quick(tmp_path / "other", tiny_bert_dir, data)


def test_overwrite_clears_the_stale_results_first(tmp_path, tiny_bert_dir, data):
    out = plant(tmp_path / "run")
    summary = quick(out, tiny_bert_dir, data, overwrite=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_examples"] == 8 == summary["train_examples"]
    assert [json.loads(line)["label"] for line in (out / "predictions.jsonl").read_text().splitlines()] != ["stale"]
    assert json.loads((out / "model" / "config.json").read_text())["model_type"] == "bert"
    assert not (out / "checkpoints").exists() and not list(out.glob(".*.tmp"))
    log = (out / "finetune.log").read_text()
    assert "OLD LOG LINE" not in log and "Cleared the earlier results" in log
    assert (out / "notes.txt").read_text() == "mine"  # not a result: left alone
    settings = json.loads((out / "model" / "finetune.json").read_text())["settings"]
    assert "overwrite" not in settings  # how this run treated its folder is no setting of the model


def test_a_failed_rerun_leaves_no_stale_results(tmp_path, tiny_bert_dir, data, monkeypatch):
    out = plant(tmp_path / "run")

    def broken(self, trainer):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(TaskEvaluator, "__call__", broken)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        quick(out, tiny_bert_dir, data, overwrite=True)
    for name in ("metrics.json", "predictions.jsonl", "model/config.json", "model/model.safetensors", "checkpoints"):
        assert not (out / name).exists(), f"{name} of the earlier run survived a failed rerun"
    log = (out / "finetune.log").read_text()
    assert "OLD LOG LINE" not in log and "Fine-tuning failed: evaluation broke" in log
    assert not is_locked(out)


def test_a_rerun_takes_a_folder_that_holds_only_a_failed_runs_log(tmp_path, tiny_bert_dir, data):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        quick(out, tiny_bert_dir, tmp_path / "missing.tsv")  # fails before writing any result
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) == ["finetune.log"]
    summary = quick(out, tiny_bert_dir, data)  # no --overwrite needed: there was nothing to protect
    assert summary["train_examples"] == 8 and (out / "metrics.json").is_file()
    log = (out / "finetune.log").read_text()
    assert log.index("Fine-tuning failed") < log.index("this run continues that log")  # the first run's story kept
    out2 = tmp_path / "run2"
    out2.mkdir()
    (out2 / "finetune.log").write_text("a log\n")
    (out2 / "notes.txt").write_text("mine")  # a log and anything else: still somebody's folder
    with pytest.raises(ValueError, match="already holds finetune.log, notes.txt"):
        quick(out2, tiny_bert_dir, data)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("trained")
    data = write_tsv(root / "d.tsv", sentiment_rows(8))
    quick(root / "run", tiny_bert_dir, data)
    return root / "run", data


def test_predict_replaces_its_output_atomically(trained, tmp_path, monkeypatch):
    run, data = trained
    output = tmp_path / "p.jsonl"
    output.write_text("old\n")
    original = TextClassification.predictions

    def cut_short(self, examples, features, outputs):
        yield original(self, examples, features, outputs)[0]
        raise OSError("disk full")

    monkeypatch.setattr(TextClassification, "predictions", cut_short)
    with pytest.raises(OSError, match="disk full"):
        predict_file(run, data, output)
    assert output.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["p.jsonl"]
    monkeypatch.setattr(TextClassification, "predictions", original)
    assert predict_file(run, data, output) == 8 and len(output.read_text().splitlines()) == 8
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        predict_file(run, data, output, batch_size=0)


def test_evaluate_refuses_results_and_replaces_them_with_overwrite(trained, tmp_path):
    run, data = trained
    out = tmp_path / "ev"
    out.mkdir()
    (out / "metrics.json").write_text('{"accuracy": 0.99}')
    with pytest.raises(ValueError, match="pass --overwrite"):
        evaluate_file(run, data, out)
    assert (out / "metrics.json").read_text() == '{"accuracy": 0.99}'
    metrics = evaluate_file(run, data, out, overwrite=True)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 8


def test_evaluate_refuses_a_held_folder(trained, holder):
    run, data = trained
    out, pid = holder
    with pytest.raises(OutputDirBusy, match=f"pid {pid}"):
        evaluate_file(run, data, out)
