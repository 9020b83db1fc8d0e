"""The finetune / predict / evaluate verbs end to end on tiny models, and bad input surfacing as file:line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import bunmyaku
from bunmyaku.cli import app
from tests.conftest import require_module
from tests.finetune.helpers import sentiment_rows

runner = CliRunner()
FAST = ["--epochs", "10", "--batch-size", "4", "--lr", "3e-3", "--max-length", "32", "--seed", "0", "--no-progress"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def finetune_args(model, train, evaluation, out, *columns):
    return [
        "finetune",
        "--task",
        "text-classification",
        "--model",
        model,
        "--train",
        train,
        "--eval",
        evaluation,
        *columns,
        *FAST,
        "--output-dir",
        out,
    ]


@pytest.fixture(scope="module")
def tsv_run(tmp_path_factory, tiny_bert_dir):
    """The exact documented form on a headerless TSV (columns by position)."""
    root = tmp_path_factory.mktemp("tsv")
    data = root / "train.tsv"
    data.write_text("".join(f"{t}\t{lab}\n" for t, lab in sentiment_rows(16)))
    out = root / "out"
    result = invoke(*finetune_args(tiny_bert_dir, data, data, out, "--text-column", "0", "--label-column", "1"))
    assert result.exit_code == 0, result.output
    return root, data, out


def test_headerless_tsv_outputs(tsv_run):
    _, data, out = tsv_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] == 1.0 and {"f1", "loss", "epoch"} <= set(metrics)
    assert metrics["accuracy"] == max(h["accuracy"] for h in metrics["history"])  # the best epoch was restored
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 16 and {p["label"] for p in predictions} == {"pos", "neg"}
    for name in ("finetune.log", "loss_curves.png", "metrics.jsonl", "model/config.json", "model/vocab.txt"):
        assert (out / name).is_file(), name
    assert not (out / "model" / "checkpoints").exists()


def test_transformers_loads_the_model(tsv_run):
    transformers = require_module("transformers")
    _, data, out = tsv_run
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "model")
    assert model.config.id2label == {0: "neg", 1: "pos"} and model.config.label2id == {"neg": 0, "pos": 1}
    texts = [line.split("\t")[0] for line in data.read_text().splitlines()]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    ours = bunmyaku.from_pretrained(out / "model")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ours(**batch).logits, atol=1e-4, rtol=1e-4)
    predicted = [model.config.id2label[i] for i in model(**batch).logits.argmax(-1).tolist()]
    assert predicted == [line.split("\t")[1] for line in data.read_text().splitlines()]


def test_predict_and_evaluate_verbs(tsv_run, tmp_path):
    _, data, out = tsv_run
    unlabelled = tmp_path / "new.tsv"
    unlabelled.write_text("great lovely film\nawful sad plot\n")
    result = invoke("predict", "--model", out, "--input", unlabelled, "--output", tmp_path / "p.jsonl")
    assert result.exit_code == 0, result.output
    labels = [json.loads(line)["label"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert labels == ["pos", "neg"]
    result = invoke("evaluate", "--model", out / "model", "--eval", data, "--output-dir", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    evaluated = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert evaluated["accuracy"] == 1.0
    # the run evaluated the same file with the same (best) weights: the same loss, as finetune reported it
    assert evaluated["loss"] == pytest.approx(json.loads((out / "metrics.json").read_text())["loss"], rel=1e-5)
    again = ["evaluate", "--model", str(out / "model"), "--eval", str(data), "--output-dir", str(tmp_path / "ev")]
    result = runner.invoke(app, again)
    assert result.exit_code == 1 and "pass --overwrite" in result.output.replace("\n", "")
    result = runner.invoke(app, [*again, "--overwrite"])
    assert result.exit_code == 0, result.output


def test_a_rerun_into_a_finished_run_needs_overwrite(tsv_run, tmp_path, tiny_bert_dir):
    _, data, out = tsv_run
    before = (out / "metrics.json").read_text()
    args = finetune_args(
        str(tiny_bert_dir), str(data), str(data), str(out), "--text-column", "0", "--label-column", "1"
    )
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "pass --overwrite" in result.output.replace("\n", "")
    assert (out / "metrics.json").read_text() == before
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    result = invoke(
        *finetune_args(tiny_bert_dir, data, data, copy, "--text-column", "0", "--label-column", "1"), "--overwrite"
    )
    assert result.exit_code == 0, result.output
    assert json.loads((copy / "metrics.json").read_text())["train_examples"] == 16
    assert "Cleared the earlier results" in (copy / "finetune.log").read_text()


def test_csv_with_header_and_pairs(tmp_path, tiny_bert_dir):
    data = tmp_path / "train.csv"
    rows = "".join(f'"{t}, really",film,{lab}\n' for t, lab in sentiment_rows(16))  # quoted commas
    data.write_text("premise,hypothesis,gold\n" + rows)
    out = tmp_path / "out"
    args = ["--text-column", "premise", "--text-pair-column", "hypothesis", "--label-column", "gold"]
    result = invoke(*finetune_args(tiny_bert_dir, data, data, out, *args))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == 1.0
    assert json.loads((out / "model" / "config.json").read_text())["label2id"] == {"neg": 0, "pos": 1}


def test_recipe_and_eval_split(tmp_path, tiny_bert_dir):
    data = tmp_path / "train.tsv"
    data.write_text("".join(f"{t}\t{lab}\n" for t, lab in sentiment_rows(40)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"task: text-classification\nmodel: {tiny_bert_dir}\ntrain: {data}\neval_split: 0.2\n"
        "text_column: 0\nlabel_column: 1\nepochs: 1\nbatch_size: 8\nprogress: false\n"
    )
    result = invoke("finetune", "--config", recipe, "--output-dir", tmp_path / "out")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["eval_examples"] == 8 and metrics["train_examples"] == 32
    assert metrics["step"] == 4, "1 epoch of 32 rows in batches of 8"
    result = invoke("finetune", "--config", recipe, "--max-steps", 3, "--output-dir", tmp_path / "capped")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "capped" / "metrics.json").read_text())["step"] == 3, "--max-steps stops earlier"


@pytest.mark.parametrize(
    ("train", "evaluation", "columns", "message"),
    [
        ("a b\tpos\nc d\tneg\n", "a b\tpos\nc d\tneg\n", ["0", "2"], "train.tsv:1: missing column(s) ['2']"),
        ("a b\tpos\nc d\tneg\n", "a b\tpos\nc d\tmaybe\n", ["0", "1"], "eval.tsv:2: label 'maybe' was not seen"),
        ("", "a b\tpos\n", ["0", "1"], "train.tsv is empty"),
        ("a b\tpos\nc d\tneg\textra\n", "a b\tpos\n", ["0", "1"], "train.tsv:2: expected 2 fields"),
    ],
    ids=["missing-column", "unseen-label", "empty-file", "ragged-row"],
)
def test_malformed_input_names_file_and_line(tmp_path, tiny_bert_dir, train, evaluation, columns, message):
    (tmp_path / "train.tsv").write_text(train)
    (tmp_path / "eval.tsv").write_text(evaluation)
    result = runner.invoke(
        app,
        finetune_args(
            str(tiny_bert_dir),
            str(tmp_path / "train.tsv"),
            str(tmp_path / "eval.tsv"),
            str(tmp_path / "out"),
            "--text-column",
            columns[0],
            "--label-column",
            columns[1],
        ),
    )
    assert result.exit_code == 1  # a user error: one error line (the shared CLI handler)
    assert message in result.output.replace("\n", "")
