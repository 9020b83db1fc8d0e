"""The ``bunmyaku`` command: help, the demo smoke test, and one ``error:`` line (exit 1) for every user error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import bunmyaku
from bunmyaku.cli import app
from tests.conftest import require_module
from tests.parity.helpers import randomize
from tests.pipelines.tiny_models import bert_head_dir

runner = CliRunner()


def test_help_lists_the_verbs():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output


def test_demo_describes_the_model_from_its_own_files(tmp_path):
    """The fill-mask demo's description comes from the folder's config.json and model card, not from code."""
    from bunmyaku.demo import model_card_summary

    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 3, "hidden_size": 48}), encoding="utf-8")
    assert model_card_summary(tmp_path) == "3 layers, width 48"
    (tmp_path / "README.md").write_text("| result | **MLM accuracy 12.5%** (loss 5) |\n", encoding="utf-8")
    assert model_card_summary(tmp_path) == "3 layers, width 48, held-out MLM accuracy 12.5%"


def test_demo_runs_offline(minilm_dir, smollm2_gguf):
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    assert "all-MiniLM-L6-v2" in result.output
    assert "bunmyaku-bert-ja-small" in result.output and "私は学校[MASK]行きます。 -> に" in result.output
    assert "A man is eating a piece of bread." in result.output
    assert "search: 'Which film is good?' -> The new movie is" in result.output
    assert "SmolLM2-135M-Instruct" in result.output and "few-shot English -> French" in result.output
    assert "Attention" in result.output  # the chat reply to the attention question (greedy, deterministic)


@pytest.fixture(scope="module")
def files(minilm_dir, shared_data, smollm2_gguf, tmp_path_factory):
    """Tiny models and the bad files each case needs, keyed by name."""
    transformers = require_module("transformers")
    root = tmp_path_factory.mktemp("bad")
    mlm = bert_head_dir(root / "mlm", minilm_dir, "BertForMaskedLM")
    qa = bert_head_dir(root / "qa", minilm_dir, "BertForQuestionAnswering")
    no_tokenizer = root / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(mlm / name, no_tokenizer / name)
    gpt2 = root / "gpt2"
    bunmyaku.Tokenizer.from_pretrained(shared_data / "gpt2-tokenizer").save_pretrained(gpt2)
    config = transformers.GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    torch.manual_seed(0)
    randomize(transformers.GPT2LMHeadModel(config), seed=0, scale=0.5).save_pretrained(gpt2)
    truncated = root / "cut.gguf"
    with open(smollm2_gguf, "rb") as source:
        truncated.write_bytes(source.read(200_000))
    (root / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    (root / "bad.yaml").write_text("files: [a.txt\nkind: bpe\n", encoding="utf-8")
    (root / "a-file").write_text("not a folder\n", encoding="utf-8")
    (root / "text.txt").write_text("The cat sat on the mat.\n\nA dog ran in the park.\n", encoding="utf-8")
    (root / "rows.jsonl").write_text('{"text": "a"}\n', encoding="utf-8")
    squad = {"data": [{"paragraphs": [{"context": "BERT came in 2018.", "qas": [{"id": "1", "answers": []}]}]}]}
    (root / "squad.json").write_text(json.dumps(squad), encoding="utf-8")
    return {"root": root, "mlm": mlm, "qa": qa, "no-tokenizer": no_tokenizer, "gpt2": gpt2, "gguf": truncated}


# (case, arguments, exit code, what the error line must name); {name} is a path from ``files``
CASES = [
    ("missing tokenizer", ["fill-mask", "-m", "{no-tokenizer}", "a [MASK]."], 1, ["No tokenizer in", "no-tokenizer"]),
    ("truncated GGUF", ["generate", "-m", "{gguf}", "hi"], 1, ["cut.gguf"]),
    ("empty prompt", ["generate", "-m", "{gpt2}", ""], 1, ["prompt 0 is empty"]),
    (
        "negative max-new-tokens",
        ["generate", "-m", "{gpt2}", "hi", "--max-new-tokens", "-1"],
        1,
        ["max_new_tokens", "-1"],
    ),
    ("zero beams", ["generate", "-m", "{gpt2}", "hi", "--num-beams", "0"], 1, ["num_beams", "0"]),
    ("top-p above 1", ["generate", "-m", "{gpt2}", "hi", "--do-sample", "--top-p", "1.5"], 1, ["top_p", "1.5"]),
    ("zero temperature", ["generate", "-m", "{gpt2}", "hi", "--do-sample", "--temperature", "0"], 1, ["temperature"]),
    ("no room to generate", ["generate", "-m", "{gpt2}", "hi", "--max-new-tokens", "128"], 1, ["128 positions"]),
    (
        "missing search file",
        ["similarity", "-m", "{mlm}", "q", "--search", "{root}/none.txt"],
        1,
        ["--search", "none.txt"],
    ),
    (
        "search file not UTF-8",
        ["similarity", "-m", "{mlm}", "q", "--search", "{root}/latin1.txt"],
        1,
        ["latin1.txt", "UTF-8"],
    ),
    ("no mask", ["fill-mask", "-m", "{mlm}", "no mask here"], 1, ["no [MASK] token", "no mask here"]),
    ("fill-mask top-k 0", ["fill-mask", "-m", "{mlm}", "a [MASK].", "--top-k", "0"], 1, ["top_k", "0"]),
    ("qa top-k 0", ["qa", "-m", "{qa}", "Who?", "--context", "BERT.", "--top-k", "0"], 1, ["top_k", "0"]),
    ("qa context file missing", ["qa", "-m", "{qa}", "Who?", "--context-file", "{root}/no.txt"], 1, ["--context-file"]),
    ("invalid tokenizer recipe", ["train-tokenizer", "--config", "{root}/bad.yaml"], 1, ["bad.yaml", "invalid YAML"]),
    ("invalid pretrain recipe", ["pretrain", "--config", "{root}/bad.yaml"], 1, ["bad.yaml", "invalid YAML"]),
    ("missing recipe", ["pretrain", "--config", "{root}/none.yaml"], 1, ["none.yaml"]),
    (
        "output dir is a file",
        ["train-tokenizer", "{root}/latin1.txt", "--output-dir", "{root}/a-file", "--data-dir", "{root}"],
        1,
        ["--output-dir", "a-file", "not a folder"],
    ),
    (
        "output dir under a file",
        ["train-tokenizer", "{root}/latin1.txt", "--output-dir", "{root}/a-file/tok", "--data-dir", "{root}"],
        1,
        ["a-file", "not a folder"],
    ),
    (
        "pretrain output dir is a file",
        ["pretrain", "--objective", "mlm", "--init-from", "{mlm}", "--data", "{root}/text.txt"]
        + ["--output-dir", "{root}/a-file", "--max-steps", "1"],
        1,
        ["a-file", "not a folder"],
    ),
    (
        "predict batch size 0",
        [
            "predict",
            "--model",
            "{mlm}",
            "--input",
            "{root}/rows.jsonl",
            "--output",
            "{root}/p.jsonl",
            "--batch-size",
            "0",
        ],
        2,  # a usage error, reported by typer
        ["--batch-size", "greater than or equal to 1"],
    ),
    (
        "SQuAD entry without question",
        ["finetune", "--task", "question-answering", "--model", "{qa}", "--train", "{root}/squad.json"]
        + ["--output-dir", "{root}/qa-run"],
        1,
        ["squad.json", "question"],
    ),
    ("model path missing offline", ["classify", "-m", "runs/agnews", "text"], 1, ["runs/agnews", "hub repo"]),
]


@pytest.mark.parametrize(("args", "code", "named"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_errors_end_with_one_line(files, args, code, named, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read once, at import
    monkeypatch.delenv("BUNMYAKU_DEBUG", raising=False)
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    result = runner.invoke(app, argv)
    output = result.output
    assert result.exit_code == code, output + repr(result.exception)
    assert "Traceback" not in output and isinstance(result.exception, SystemExit), output
    if code == 1:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in named:
        assert word in " ".join(output.split()), f"{word!r} not in {output!r}"


def test_bugs_keep_their_traceback_and_debug_shows_user_errors(files, monkeypatch):
    """A user error with --debug, and an exception that is not a user error, reach the caller unchanged."""
    result = runner.invoke(app, ["--debug", "fill-mask", "-m", str(files["mlm"]), "no mask here"])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError), result.output

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("bunmyaku.pipeline", broken)
    result = runner.invoke(app, ["fill-mask", "-m", str(files["mlm"]), "a [MASK]."])
    assert isinstance(result.exception, RuntimeError) and "error: " not in result.output


def test_an_output_dir_that_is_not_writable_is_refused_before_training(files, monkeypatch):
    """(Tests run as root here, where every folder is writable: the permission check itself is replaced.)"""
    monkeypatch.setattr("os.access", lambda path, mode: False)
    root = files["root"]
    args = ["train-tokenizer", f"{root}/text.txt", "--output-dir", f"{root}/tok", "--data-dir", str(root)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and result.stderr == f"error: --output-dir {root}/tok: {root} is not writable\n"


def test_train_tokenizer_reads_a_file_named_relative_to_the_current_folder(tmp_path, monkeypatch):
    """`bunmyaku train-tokenizer corpus.txt` (as the README writes it) reads ./corpus.txt, not the data folder's."""
    (tmp_path / "corpus.txt").write_text("a small corpus of words\n" * 50, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BUNMYAKU_DATA", str(tmp_path / "elsewhere"))
    result = runner.invoke(app, ["train-tokenizer", "corpus.txt", "--vocab-size", "60", "--output-dir", "tok"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
