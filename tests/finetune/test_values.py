"""Non-finite labels and options are refused with where they are; an undefined metric is None, never 0.0."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from bunmyaku.data.tables import DataError
from bunmyaku.tasks.finetune import FinetuneArgs, build_task
from tests.finetune.helpers import finetune, sentiment_rows, write_tsv


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "NaN", "Infinity"])
def test_non_finite_regression_label_in_a_table_names_file_and_line(tmp_path, bad):
    rows = [("a b", "1.0"), ("c d", "2.5"), ("e f", bad), ("g h", "0.5")]
    path = write_tsv(tmp_path / "d.tsv", rows)
    task = build_task(FinetuneArgs(problem_type="regression", text_column="0", label_column="1"))
    with pytest.raises(DataError, match=rf"d.tsv:3: label '{bad}' is not a finite number"):
        task.read(path)
    assert len(task.read(path, labelled=False)) == 4  # predicting needs no labels


def test_non_finite_scores_in_jsonl(tmp_path):
    """json.loads reads the bare NaN / Infinity that Python's json.dumps writes."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": "x", "b": "y", "score": 1.0}\n{"a": "x", "b": "y", "score": Infinity}\n')
    cross = build_task(
        FinetuneArgs(task="sentence-similarity", text_column="a", text_pair_column="b", label_column="score")
    )
    with pytest.raises(DataError, match=r"d.jsonl:2: label inf is not a finite number"):
        cross.read(path)
    bi = build_task(
        FinetuneArgs(
            task="sentence-similarity", encoder="bi", text_column="a", text_pair_column="b", label_column="score"
        )
    )
    with pytest.raises(DataError, match=r"d.jsonl:2: score inf is not a finite number"):
        bi.read(path)


def test_choice_label_checked_while_reading(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"q": "x", "c0": "a", "c1": "b", "label": 1}\n{"q": "x", "c0": "a", "c1": "b", "label": 2}\n')
    task = build_task(FinetuneArgs(task="multiple-choice", text_column="q", choice_columns="c0,c1"))
    with pytest.raises(DataError, match=r"mc.jsonl:2: label 2 is not a choice index in 0..1"):
        task.read(path)


def test_a_nan_label_stops_the_run_before_training(tmp_path, tiny_bert_dir):
    rows = [(t, str(float(i % 3))) for i, (t, _) in enumerate(sentiment_rows(8))]
    rows[5] = (rows[5][0], "nan")
    data = write_tsv(tmp_path / "d.tsv", rows)
    out = tmp_path / "run"
    settings = {"problem_type": "regression", "text_column": "0", "label_column": "1"}
    with pytest.raises(DataError, match=r"d.tsv:6: label 'nan' is not a finite number"):
        finetune(out, model=str(tiny_bert_dir), train=str(data), eval=str(data), **settings)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["finetune.log"]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("epochs", float("nan"), "epochs must be a finite number, got nan"),
        ("epochs", float("inf"), "epochs must be a finite number, got inf"),
        ("epochs", 0, r"epochs must be in \(0, inf\), got 0"),
        ("epochs", -1.0, r"epochs must be in \(0, inf\), got -1.0"),
        ("epochs", True, "epochs must be a number, got True"),
        ("epochs", "3", r"epochs must be a number, got '3' \(YAML"),
        ("max_length", float("nan"), "max_length must be a whole number, got nan"),
        ("max_length", 0, "max_length must be at least 8, got 0"),
        ("max_length", 64.0, "max_length must be a whole number, got 64.0"),
        ("eval_batch_size", -1, "eval_batch_size must be at least 0"),
        ("eval_batch_size", float("inf"), "eval_batch_size must be a whole number, got inf"),
        ("patience", -2, "patience must be at least 0"),
        ("stride", "many", "stride must be a whole number"),
        ("n_best", 0, "n_best must be at least 1"),
        ("max_answer_length", 0, "max_answer_length must be at least 1"),
        ("warmup_ratio", float("nan"), "warmup_ratio must be a finite number"),
        ("warmup_ratio", 1.5, r"warmup_ratio must be in \[0, 1\], got 1.5"),
        ("eval_split", float("nan"), "eval_split must be a finite number"),
        ("test_split", 1.0, r"test_split must be in \[0, 1\), got 1.0"),
        ("scale", 0.0, r"scale must be in \(0, inf\)"),
        ("label_max", float("inf"), "label_max must be a finite number"),
        ("lm_weight", -0.5, r"lm_weight must be in \[0, inf\)"),
        ("null_threshold", float("-inf"), "null_threshold must be a finite number"),
    ],
)
def test_bad_numeric_options_name_the_option(option, value, message):
    with pytest.raises(ValueError, match=message):
        FinetuneArgs(**{option: value})


# ------------------------------------------------------------------------------------------------
# Undefined metrics


def test_regression_metrics_of_constant_predictions_are_none(caplog):
    task = build_task(FinetuneArgs(problem_type="regression"))
    features = [{"labels": v} for v in (0.0, 1.0, 2.0)]
    with caplog.at_level(logging.WARNING, logger="bunmyaku.tasks.metrics"):
        scores = task.metrics([], features, [torch.tensor([0.7])] * 3)
    assert scores["pearson"] is None and scores["spearman"] is None
    assert scores["mse"] == pytest.approx(((0.7) ** 2 + 0.3**2 + 1.3**2) / 3, rel=1e-6)
    assert "pearson is undefined" in caplog.text and "spearman is undefined" in caplog.text


def test_constant_gold_scores_give_null_correlations_not_zero(tmp_path, tiny_bert_dir, caplog):
    train = write_tsv(tmp_path / "train.tsv", [(t, str(float(i % 4))) for i, (t, _) in enumerate(sentiment_rows(8))])
    flat = write_tsv(tmp_path / "flat.tsv", [(t, "2.0") for t, _ in sentiment_rows(8)])
    out = tmp_path / "run"
    settings = {"problem_type": "regression", "text_column": "0", "label_column": "1", "epochs": 2}
    with caplog.at_level(logging.WARNING, logger="bunmyaku.tasks.metrics"):
        summary = finetune(out, model=str(tiny_bert_dir), train=str(train), eval=str(flat), **settings)
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["spearman"] is None and metrics["spearman"] is None and metrics["pearson"] is None
    assert metrics["mse"] > 0 and metrics["epoch"] == 1.0
    assert "spearman is undefined" in caplog.text


@pytest.mark.parametrize("size", [0, -4, 2.0, True])
def test_batch_sizes_must_be_positive_integers(size):
    from bunmyaku.data.loader import BatchStream, eval_batches
    from bunmyaku.tasks.base import GroupedBatches

    rows = [{"input_ids": [1, 2]}] * 4
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer"):
        BatchStream(rows, lambda x, **_: x, batch_size=size)
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer"):
        list(eval_batches(rows, lambda x, **_: x, batch_size=size))
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer"):
        GroupedBatches(rows, size)
