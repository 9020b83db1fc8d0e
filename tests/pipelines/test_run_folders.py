"""Every verb takes a finetune run folder (``runs/x``) as well as its model (``runs/x/model``), and a verb given a
checkpoint without the head it needs ends with one ``error:`` line naming the folder, its architectures and the
head, instead of running a newly initialised (random) head; the Python pipelines raise the same ValueError."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from typer.testing import CliRunner

import bunmyaku
from bunmyaku.cli import app
from bunmyaku.hub.files import model_in_run_folder
from tests.conftest import require_module
from tests.finetune.helpers import save_tiny, sentiment_rows
from tests.pipelines.tiny_models import NER_LABELS, bert_head_dir

require_module("transformers")
runner = CliRunner()


def run_folder(root, name, make_model):
    """``root/name`` laid out as a finetune run: results at the top, the model in ``model/``."""
    run = root / name
    make_model(run / "model")
    (run / "metrics.json").write_text('{"accuracy": 0.5}\n')
    (run / "predictions.jsonl").write_text("")
    return run


@pytest.fixture(scope="module")
def runs(minilm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")

    def bert(head, **config):
        return lambda path: bert_head_dir(path, minilm_dir, head, **config)

    folders = {
        "mlm": run_folder(root, "mlm", bert("BertForMaskedLM")),
        "base": run_folder(root, "base", bert("BertModel")),
        "cls": run_folder(root, "cls", bert("BertForSequenceClassification", id2label={0: "neg", 1: "pos"})),
        "ner": run_folder(root, "ner", bert("BertForTokenClassification", id2label=dict(enumerate(NER_LABELS)))),
        "qa": run_folder(root, "qa", bert("BertForQuestionAnswering")),
        "gpt2": run_folder(root, "gpt2", lambda path: save_tiny(path, "gpt2")),
    }
    # a real run of `bunmyaku finetune`, for predict and evaluate (they read its finetune.json)
    data = root / "train.tsv"
    data.write_text("".join(f"{t}\t{lab}\n" for t, lab in sentiment_rows(8)))
    tiny = save_tiny(root / "tiny-bert", "bert")
    args = ["finetune", "--task", "text-classification", "--model", tiny, "--train", data, "--eval", data]
    args += ["--text-column", "0", "--label-column", "1", "--epochs", "1", "--batch-size", "4", "--no-progress"]
    result = runner.invoke(app, [str(a) for a in [*args, "--output-dir", root / "finetuned"]])
    assert result.exit_code == 0, result.output + repr(result.exception)
    folders["finetuned"], folders["data"] = root / "finetuned", data
    return folders


def invoke(args: list) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


# verb -> (run folder, arguments after --model)
VERBS = {
    "classify": ("cls", ["--json", "a fine film", "a dull plot"]),
    "ner": ("ner", ["--json", "Ada Lovelace lived in London."]),
    "qa": ("qa", ["--json", "Who came?", "--context", "BERT came in 2018 from Google."]),
    "fill-mask": ("mlm", ["--json", "Paris is the [MASK] of France."]),
    "generate": ("gpt2", ["--json", "good film", "--max-new-tokens", "4"]),
    "similarity": ("base", ["--json", "a cat", "a dog"]),
}


@pytest.mark.parametrize("verb", list(VERBS))
def test_each_pipeline_verb_takes_the_run_folder(runs, verb):
    name, args = VERBS[verb]
    run = runs[name]
    assert not (run / "config.json").exists()
    from_run = json.loads(invoke([verb, "--model", run, *args]))
    assert from_run and from_run == json.loads(invoke([verb, "--model", run / "model", *args]))


def test_predict_and_evaluate_take_the_run_folder(runs, tmp_path):
    run, data = runs["finetuned"], runs["data"]
    for model in (run, run / "model"):
        invoke(["predict", "--model", model, "--input", data, "--output", tmp_path / f"{model.name}.jsonl"])
    assert (tmp_path / "finetuned.jsonl").read_text() == (tmp_path / "model.jsonl").read_text()
    assert len((tmp_path / "model.jsonl").read_text().splitlines()) == 8
    metrics = [json.loads(invoke(["evaluate", "--model", m, "--eval", data])) for m in (run, run / "model")]
    assert metrics[0] == metrics[1] and "accuracy" in metrics[0]
    # and the classify verb reads the same run
    labels = json.loads(invoke(["classify", "--model", run, "--json", "a fine film"]))[0]["labels"]
    assert labels[0]["label"] in {"pos", "neg"}


def test_python_api_takes_the_run_folder(runs, monkeypatch):
    monkeypatch.chdir(runs["cls"].parent)
    assert bunmyaku.from_pretrained("cls").config.id2label == {0: "neg", 1: "pos"}
    assert bunmyaku.Tokenizer.from_pretrained("cls").vocab_size == 30522
    assert bunmyaku.pipeline("text-classification", model="cls")(["fine"])[0]["label"] in {"neg", "pos"}


def test_a_model_folder_is_never_taken_for_a_run_folder(runs, tmp_path):
    """Only a folder without its own config.json (and tokenizer) is read as a run folder."""
    folder = tmp_path / "m"
    shutil.copytree(runs["cls"] / "model", folder)
    shutil.copytree(runs["mlm"] / "model", folder / "model")
    assert model_in_run_folder(folder) == folder
    assert model_in_run_folder(runs["cls"]) == runs["cls"] / "model"
    assert model_in_run_folder(runs["cls"] / "model") == runs["cls"] / "model"
    empty = tmp_path / "empty"
    (empty / "model").mkdir(parents=True)  # a model/ without config.json is not a run's model
    assert model_in_run_folder(empty) == empty


# (verb, the folder given, arguments, what the one error line must name besides the folder)
HEAD_ERRORS = [
    ("fill-mask", "cls", ["a [MASK]."], ["fill-mask", "masked-lm", "BertForSequenceClassification"]),
    ("fill-mask", "base", ["a [MASK]."], ["fill-mask", "masked-lm", "['BertModel']", "no trained masked-lm weights"]),
    ("classify", "base", ["text"], ["text-classification", "sequence-classification", "['BertModel']"]),
    ("classify", "qa", ["text"], ["sequence-classification", "BertForQuestionAnswering"]),
    ("classify", "ner", ["text"], ["sequence-classification", "(a token-classification head)"]),
    ("ner", "cls", ["text"], ["token-classification", "(a sequence-classification head)"]),
    ("qa", "mlm", ["Who?", "--context", "BERT."], ["question-answering", "BertForMaskedLM"]),
    ("qa", "cls", ["Who?", "--context", "BERT."], ["question-answering", "BertForSequenceClassification"]),
    ("generate", "mlm", ["hi"], ["text-generation", "causal-lm", "BertForMaskedLM"]),
]


@pytest.mark.parametrize(("verb", "name", "args", "named"), HEAD_ERRORS, ids=[f"{c[0]}-{c[1]}" for c in HEAD_ERRORS])
@pytest.mark.parametrize("given", ["run", "model"])
def test_a_checkpoint_without_the_head_is_one_error_line(runs, verb, name, args, named, given, caplog, monkeypatch):
    monkeypatch.delenv("BUNMYAKU_DEBUG", raising=False)
    folder = runs[name] if given == "run" else runs[name] / "model"
    with caplog.at_level(logging.INFO):
        result = runner.invoke(app, [verb, "--model", str(folder), *args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    text = " ".join(result.stderr.split())
    for word in [f"{runs[name] / 'model'}:", *named]:
        assert word in text, f"{word!r} not in {text!r}"
    assert "newly initialised" not in caplog.text  # refused before loading, not after a random head


def test_other_verbs_errors_are_one_line(runs, tmp_path, monkeypatch):
    """similarity on an architecture bunmyaku lacks; predict / evaluate on a model no finetune run wrote."""
    monkeypatch.delenv("BUNMYAKU_DEBUG", raising=False)
    t5 = tmp_path / "t5-run" / "model"
    shutil.copytree(runs["base"] / "model", t5)
    config = json.loads((t5 / "config.json").read_text())
    (t5 / "config.json").write_text(json.dumps({**config, "model_type": "t5", "architectures": ["T5Model"]}))
    cases = [
        (["similarity", "--model", t5.parent, "a", "b"], [f"{t5 / 'config.json'}:", "model_type 't5'"]),
        (["predict", "--model", runs["cls"], "--input", runs["data"], "--output", tmp_path / "p.jsonl"], ["cls"]),
        (["evaluate", "--model", runs["cls"], "--eval", runs["data"]], ["finetune.json"]),
    ]
    for args, named in cases:
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
        for word in named:
            assert word in " ".join(result.stderr.split()), (word, result.stderr)


def test_pipelines_raise_the_same_value_error(runs):
    with pytest.raises(ValueError, match=r"fill-mask pipeline needs a model with a masked-lm head .*BertModel"):
        bunmyaku.pipeline("fill-mask", model=runs["base"])
    with pytest.raises(ValueError, match=r"question-answering pipeline .* \['BertForMaskedLM'\]"):
        bunmyaku.pipeline("question-answering", model=runs["mlm"] / "model")


def test_heads_that_hold_the_needed_one_are_accepted(runs, minilm_dir, tmp_path):
    """BertForPreTraining holds the MLM head, and a GPT-2 base model's LM head is its tied token embeddings:
    both load for the verbs that need those heads, as in transformers."""
    pretraining = bert_head_dir(tmp_path / "pretraining", minilm_dir, "BertForPreTraining")
    assert len(bunmyaku.pipeline("fill-mask", model=pretraining, top_k=2)("a [MASK].")) == 2
    base_gpt2 = tmp_path / "gpt2-base"
    shutil.copytree(runs["gpt2"] / "model", base_gpt2)
    from bunmyaku.models.gpt2 import GPT2Model

    GPT2Model.from_pretrained(base_gpt2).save_pretrained(base_gpt2)  # architectures: GPT2Model, no lm_head
    assert json.loads((base_gpt2 / "config.json").read_text())["architectures"] == ["GPT2Model"]
    generated = bunmyaku.pipeline("text-generation", model=base_gpt2)("good", max_new_tokens=2)
    assert isinstance(generated[0]["generated_text"], str)


def test_version():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"bunmyaku {version('bunmyaku')}\n"
