"""bunmyaku.finetune: the CLI's twin in Python (same options, same defaults, same numbers), in-memory data, the
returned result, callbacks and compute_metrics, output_dir=None, eval-every / exact resume, the model card."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import bunmyaku
from bunmyaku.cli import app
from bunmyaku.training import Plugin
from tests.conftest import require_module
from tests.finetune.helpers import sentiment_rows

runner = CliRunner()
# only what the test needs; everything else (lr, schedule, warmup, weight decay, ...) stays at the defaults
SHORT = {"epochs": 2, "batch_size": 4, "max_length": 32, "seed": 0}
QUIET = {"progress": False, "plot": False, "device": "cpu"}
COMMON = {"task": "text-classification", **SHORT}


def cli_flags(settings: dict) -> list[str]:
    flags = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)]
    return flags


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rows = [{"text": t, "label": lab} for t, lab in sentiment_rows(16)]
    held = [{"text": t, "label": lab} for t, lab in sentiment_rows(8, seed=1)]
    for name, records in (("train", rows), ("eval", held)):
        (root / f"{name}.tsv").write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in records))
    return root, rows, held


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_bert_dir, data):
    root, _, _ = data
    out = tmp_path_factory.mktemp("cli") / "run"
    settings = {**COMMON, "model": tiny_bert_dir, "train": root / "train.tsv", "eval": root / "eval.tsv"}
    result = runner.invoke(app, ["finetune", *cli_flags({**settings, "progress": False, "output_dir": out})])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "metrics.json").read_text())


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "train_seconds"}


def in_memory(kind: str, records: list[dict], path: Path):
    if kind == "path":
        return path
    if kind == "str":
        return str(path)
    if kind == "list":
        return records
    if kind == "dataframe":
        return require_module("pandas").DataFrame(records)
    datasets = require_module("datasets")
    return datasets.DatasetDict({"split": datasets.Dataset.from_list(records)})["split"]


@pytest.mark.parametrize("kind", ["path", "str", "list", "dataframe", "dataset"])
def test_python_gives_the_cli_metrics_on_every_input_kind(cli_run, tiny_bert_dir, data, kind):
    _, expected = cli_run
    root, rows, held = data
    train, evaluation = in_memory(kind, rows, root / "train.tsv"), in_memory(kind, held, root / "eval.tsv")
    result = bunmyaku.finetune(model=tiny_bert_dir, train=train, eval=evaluation, **COMMON, **QUIET)
    # identical numbers: the same defaults (lr, schedule, warmup...) reach the loop from Python and from the CLI
    assert comparable(result.metrics) == comparable(expected)
    assert result.metrics["train_examples"] == 16 and result.metrics["eval_examples"] == 8


def test_the_defaults_are_fine_tuning_defaults_from_one_place():
    from bunmyaku.tasks.finetune import OPTION_CLASSES
    from bunmyaku.training.args import field_docs

    parameters = __import__("inspect").signature(bunmyaku.finetune).parameters
    assert parameters["lr"].default == 5e-5 and parameters["schedule"].default == "linear"
    assert parameters["output_dir"].default is None and parameters["max_steps"].default == 0
    assert all(p.kind is p.KEYWORD_ONLY for p in parameters.values())
    options = {name for cls in OPTION_CLASSES for name in field_docs(cls)}
    assert set(parameters) == options  # exactly the command's options
    from bunmyaku.cli import _finetune_command

    flags = __import__("inspect").signature(_finetune_command()).parameters  # the --help texts come from the same
    assert (
        flags["lr"].default.help.endswith("[default: 5e-05]") and "[default: linear]" in flags["schedule"].default.help
    )
    assert {"finetune", "FinetuneResult"} <= set(dir(bunmyaku))
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['learning_rate'\]"):
        bunmyaku.finetune(learning_rate=1e-3)


def test_path_arguments_and_the_result(tmp_path, tiny_bert_dir, data):
    transformers = require_module("transformers")
    root, _, held = data
    out = tmp_path / "run"
    result = bunmyaku.finetune(
        model=Path(tiny_bert_dir),
        tokenizer=Path(tiny_bert_dir),
        train=root / "train.tsv",
        eval=root / "eval.tsv",
        output_dir=out,
        **{**COMMON, "epochs": 4, "lr": 3e-3},
        **QUIET,
    )
    settings = json.loads((out / "model" / "finetune.json").read_text())["settings"]
    assert settings["model"] == str(tiny_bert_dir) and settings["train"] == str(root / "train.tsv")
    assert comparable(json.loads((out / "metrics.json").read_text())) == comparable(result.metrics)
    assert not result.model.training
    # predict: the records predictions.jsonl holds
    written = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert result.predict(root / "eval.tsv") == written
    unlabelled = [{k: v for k, v in p.items() if k != "gold"} for p in written]
    assert result.predict([{"text": r["text"]} for r in held]) == unlabelled
    # evaluate: the best evaluation's metrics again
    scores = result.evaluate(held)
    assert scores["accuracy"] == result.metrics["accuracy"] and scores["loss"] == pytest.approx(result.metrics["loss"])
    # save: the run's model/ layout, which transformers loads with equal logits
    saved = result.save(tmp_path / "saved")
    assert {p.name for p in saved.iterdir()} == {p.name for p in (out / "model").iterdir()}
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(saved).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(saved)
    batch = tokenizer([r["text"] for r in held], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch).logits, result.model(**batch).logits, atol=1e-5, rtol=1e-5)


def test_a_loaded_model_and_tokenizer(tiny_bert_dir, data):
    _, rows, held = data
    model = bunmyaku.from_pretrained(tiny_bert_dir, task="sequence-classification", num_labels=2)
    tokenizer = bunmyaku.Tokenizer.from_pretrained(tiny_bert_dir)
    with pytest.raises(ValueError, match="give tokenizer="):
        bunmyaku.finetune(model=model, train=rows, eval=held, **COMMON, **QUIET)
    result = bunmyaku.finetune(model=model, tokenizer=tokenizer, train=rows, eval=held, **COMMON, **QUIET)
    assert result.model is model and result.model.config.id2label == {0: "neg", 1: "pos"}
    three = bunmyaku.from_pretrained(tiny_bert_dir, task="sequence-classification", num_labels=3)
    with pytest.raises(ValueError, match="head has 3 outputs but the training data has 2 labels"):
        bunmyaku.finetune(model=three, tokenizer=tokenizer, train=rows, eval=held, **COMMON, **QUIET)


def test_predict_takes_plain_texts_and_the_result_prints_briefly(tiny_bert_dir, data):
    pd = require_module("pandas")
    _, rows, held = data
    result = bunmyaku.finetune(model=tiny_bert_dir, train=rows, eval=held, **COMMON, **QUIET)
    texts = [r["text"] for r in held]
    from_rows = result.predict([{"text": t} for t in texts])
    assert result.predict(texts) == from_rows  # a list of strings, as users pass it
    assert result.predict(pd.Series(texts)) == from_rows
    assert [p["label"] for p in from_rows] and all(p["label"] in ("neg", "pos") for p in from_rows)
    shown = repr(result)
    assert shown.startswith("FinetuneResult(task='text-classification', model=BertForSequenceClassification")
    assert "accuracy" in shown and len(shown) < 400 and "history" not in shown


def test_in_memory_errors_name_the_row(tiny_bert_dir, data):
    datasets = require_module("datasets")
    _, rows, held = data
    broken = [*rows[:3], {"text": "no label here"}]
    with pytest.raises(ValueError, match=r"row 4: missing column\(s\) \['label'\]"):
        bunmyaku.finetune(model=tiny_bert_dir, train=broken, eval=held, **COMMON, **QUIET)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
    with pytest.raises(ValueError, match=r"DatasetDict holds splits \(train\): pass one of them"):
        bunmyaku.finetune(model=tiny_bert_dir, train=splits, eval=held, **COMMON, **QUIET)


def test_output_dir_none_leaves_nothing_behind(tmp_path, tiny_bert_dir, data, monkeypatch):
    _, rows, held = data
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    monkeypatch.chdir(tmp_path)
    seen = []

    class Look(Plugin):
        def on_evaluate(self, trainer, metrics):
            seen.append(sorted(p.name for p in trainer.output_dir.iterdir()))

    result = bunmyaku.finetune(model=tiny_bert_dir, train=rows, eval=held, save_every=2, callbacks=[Look()], **COMMON)
    assert any("checkpoints" in names for names in seen), "the run did write checkpoints, into a temporary folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scratch"] and not list(scratch.iterdir())
    assert result.metrics["eval_examples"] == 8 and result.history[0]["step"] == 1


class Recorder(Plugin):
    """Records every hook call (the class keeps the calls, so that a recipe's instance can be inspected)."""

    calls: list[tuple[str, int]] = []

    def on_fit_start(self, trainer):
        Recorder.calls.append(("on_fit_start", trainer.step))

    def before_backward(self, trainer, loss):
        Recorder.calls.append(("before_backward", trainer.step))

    def after_backward(self, trainer):
        Recorder.calls.append(("after_backward", trainer.step))

    def before_optimizer_step(self, trainer):
        Recorder.calls.append(("before_optimizer_step", trainer.step))

    def after_optimizer_step(self, trainer):
        Recorder.calls.append(("after_optimizer_step", trainer.step))

    def on_evaluate(self, trainer, metrics):
        Recorder.calls.append(("on_evaluate", trainer.step))
        assert "eval_accuracy" in metrics and "eval_positives" in metrics


def positives(predictions, labels):
    """An extra metric: the share of predicted positives, and a check that the gold labels came along."""
    assert len(predictions) == len(labels) and set(labels) == {"pos", "neg"}
    return {"positives": sum(p["label"] == "pos" for p in predictions) / len(predictions)}


def test_callbacks_and_compute_metrics(tiny_bert_dir, data):
    _, rows, held = data
    Recorder.calls = []
    result = bunmyaku.finetune(
        model=tiny_bert_dir,
        train=rows,
        eval=held,
        callbacks=[Recorder()],
        compute_metrics=positives,
        **COMMON,
        **QUIET,
    )
    calls = Recorder.calls
    assert calls[0] == ("on_fit_start", 0)
    steps = [s for name, s in calls if name == "after_optimizer_step"]
    assert steps == list(range(8)), "2 epochs of 16 rows in batches of 4; the hook sees the step before counting it"
    step_calls = [name for name, s in calls if s == 0 and name != "on_fit_start"]
    assert step_calls == ["before_backward", "after_backward", "before_optimizer_step", "after_optimizer_step"]
    assert [s for name, s in calls if name == "on_evaluate"] == [4, 8], "once per epoch"
    predicted = [p["label"] for p in result.predict(held)]
    assert result.metrics["positives"] == predicted.count("pos") / len(predicted)
    assert [h["positives"] for h in result.metrics["history"]] == [
        r["eval_positives"] for r in result.history if "eval_positives" in r
    ]
    assert result.evaluate(held)["positives"] == result.metrics["positives"]


def test_callbacks_and_compute_metrics_from_a_recipe(tmp_path, tiny_bert_dir, data):
    root, _, _ = data
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"task: text-classification\nmodel: {tiny_bert_dir}\ntrain: {root / 'train.tsv'}\neval: {root / 'eval.tsv'}\n"
        "epochs: 1\nbatch_size: 8\nprogress: false\nplot: false\n"
        "callbacks: [tests.finetune.test_api:Recorder]\ncompute_metrics: tests.finetune.test_api:positives\n"
    )
    Recorder.calls = []
    result = runner.invoke(app, ["finetune", "--config", str(recipe), "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert [s for name, s in Recorder.calls if name == "on_evaluate"] == [2]
    assert "positives" in json.loads((tmp_path / "out" / "metrics.json").read_text())
    bad = runner.invoke(
        app, ["finetune", "--config", str(recipe), "--callbacks", "tests.finetune.nowhere:X", "--output-dir", "x2"]
    )
    assert bad.exit_code == 1 and "callbacks: cannot import 'tests.finetune.nowhere'" in bad.output


def test_eval_every_steps_logs_from_step_1_and_plots_with_a_title(tmp_path, tiny_bert_dir, data, monkeypatch):
    from bunmyaku.training import trainer as trainer_module

    _, rows, held = data
    plotted = []
    original = trainer_module.plot_losses

    def spy(metrics_path, png_path, title=None, metric=None):
        plotted.append((title, metric))
        return original(metrics_path, png_path, title=title, metric=metric)

    monkeypatch.setattr(trainer_module, "plot_losses", spy)
    out = tmp_path / "run"
    settings = {**COMMON, "epochs": 3, "eval_every": 5, "progress": False, "device": "cpu"}
    result = bunmyaku.finetune(model=tiny_bert_dir, train=rows, eval=held, output_dir=out, **settings)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [5, 10, 12], "every 5 steps and at the end"
    assert [h["step"] for h in result.metrics["history"]] == [5, 10, 12]
    assert [r["step"] for r in records if "loss" in r] == [1, 12], "log_every 20: the first and the last step"
    assert all("eval_accuracy" in r for r in records if "eval_loss" in r)
    assert plotted == [(f"run: {tiny_bert_dir}, text-classification", "accuracy")]
    assert (out / "loss_curves.png").stat().st_size > 1000


class Kill(Plugin):
    """Stops the process's training at a step, as a kill would (KeyboardInterrupt is no Exception)."""

    def __init__(self, step: int):
        self.step = step

    def after_optimizer_step(self, trainer):
        if trainer.step + 1 == self.step:
            raise KeyboardInterrupt


def test_a_killed_run_resumes_exactly(tmp_path, tiny_bert_dir, data):
    _, rows, held = data
    settings = {**COMMON, "epochs": 3, "save_every": 2, "keep_last": 1, "eval_every": 3, "lr": 3e-3, **QUIET}
    whole = bunmyaku.finetune(model=tiny_bert_dir, train=rows, eval=held, output_dir=tmp_path / "whole", **settings)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        bunmyaku.finetune(model=tiny_bert_dir, train=rows, eval=held, output_dir=out, callbacks=[Kill(7)], **settings)
    assert not (out / "metrics.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["finetune.json", "step-00000006"]
    changed = {**settings, "lr": 1e-3}
    with pytest.raises(ValueError, match=r"checkpoints of a run with other settings \(lr\)"):
        bunmyaku.finetune(model=tiny_bert_dir, train=rows, eval=held, output_dir=out, **changed)
    resumed = bunmyaku.finetune(model=tiny_bert_dir, train=rows, eval=held, output_dir=out, **settings)
    assert "Resumed from" in (out / "finetune.log").read_text()
    assert comparable(resumed.metrics) == comparable(whole.metrics)
    ours, theirs = load_file(out / "model" / "model.safetensors"), load_file(tmp_path / "whole/model/model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    timeless = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in resumed.history]
    assert timeless == [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in whole.history]
    assert [r["step"] for r in resumed.history if "loss" in r] == [1, 12]


def test_the_model_card(tmp_path, tiny_bert_dir, data):
    root, rows, held = data
    out = tmp_path / "run"
    files = {"train": root / "train.tsv", "eval": root / "eval.tsv"}
    result = bunmyaku.finetune(model=tiny_bert_dir, output_dir=out, **files, **COMMON, **QUIET)
    card = (out / "model" / "README.md").read_text()
    assert f"fine-tuned from {tiny_bert_dir}" in card
    assert f"- train: {files['train']}" in card and f"- eval: {files['eval']}" in card
    assert "tags: [bunmyaku, text-classification]" in card
    assert f"| accuracy | {result.metrics['accuracy']:.4f} |" in card
    assert "- lr: 5e-05" in card and "- batch_size: 4" in card and "- seed: 0" in card
    assert datetime.datetime.now(datetime.timezone.utc).date().isoformat() in card
    assert f"bunmyaku {bunmyaku.__version__}" in card
    assert oct(os.stat(out / "model" / "README.md").st_mode & 0o777) == "0o644"
    memory = bunmyaku.finetune(model=tiny_bert_dir, train=rows, eval=held, **COMMON, **QUIET)
    assert "- train: in-memory data" in (memory.save(tmp_path / "saved") / "README.md").read_text()


def squad_rows(path: Path) -> list[dict]:
    """A SQuAD file's questions in the layout of Hugging Face's squad data sets."""
    rows = []
    for article in json.loads(path.read_text())["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = {k: [a[k] for a in qa["answers"]] for k in ("text", "answer_start")}
                question = {"id": qa["id"], "title": article["title"], "question": qa["question"]}
                rows.append({**question, "context": paragraph["context"], "answers": answers})
    return rows


@pytest.mark.parametrize("task", ["token-classification", "question-answering"])
def test_in_memory_rows_equal_the_file_for_tagging_and_qa(tmp_path, tiny_bert_dir, task):
    from tests.finetune.helpers import ner_records, squad_file

    if task == "token-classification":
        records = ner_records(12)
        path = tmp_path / "ner.json"
        path.write_text(json.dumps(records))
        settings = {"format": "spans", "label_column": "entities"}
    else:
        path = squad_file(tmp_path / "squad.json", 12)
        records = squad_rows(path)
        settings = {"max_length": 16, "stride": 6}
    common = {**COMMON, "task": task, **settings, **QUIET, "model": tiny_bert_dir, "lr": 3e-3}
    from_file = bunmyaku.finetune(train=path, eval=path, **common)
    from_rows = bunmyaku.finetune(train=records, eval=records, **common)
    assert comparable(from_rows.metrics) == comparable(from_file.metrics)
    assert from_rows.predict(records) == from_file.predict(path)


def test_a_killed_bi_encoder_run_resumes_exactly(tmp_path, tiny_bert_dir):
    rows = [{"a": t, "b": t.split()[0] + " " + lab, "score": 1.0} for t, lab in sentiment_rows(16)]
    settings = {**COMMON, "task": "sentence-similarity", "encoder": "bi", "loss": "contrastive", **QUIET}
    settings.update(text_column="a", text_pair_column="b", label_column=None, save_every=3, lr=1e-3)
    whole = bunmyaku.finetune(model=tiny_bert_dir, train=rows, eval=rows, output_dir=tmp_path / "whole", **settings)
    with pytest.raises(KeyboardInterrupt):
        bunmyaku.finetune(
            model=tiny_bert_dir, train=rows, eval=rows, output_dir=tmp_path / "k", callbacks=[Kill(5)], **settings
        )
    resumed = bunmyaku.finetune(model=tiny_bert_dir, train=rows, eval=rows, output_dir=tmp_path / "k", **settings)
    assert comparable(resumed.metrics) == comparable(whole.metrics)
    ours, theirs = resumed.model.state_dict(), whole.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
