"""``bunmyaku pretrain`` end to end on a tiny corpus: the output folder loads in ``transformers``."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import bunmyaku
from bunmyaku.cli import app
from bunmyaku.tokenization import Tokenizer

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "ran", "to", "a", "park", "big", "small", "red"]
PIECES = ["##s", "##ed", "##ing"]


@pytest.fixture()
def corpus(tmp_path):
    lines = [
        " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] + ("s" if (i + j) % 4 == 0 else "") for j in range(6 + i % 5))
        for i in range(120)
    ]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(lines[i] + "\n" + lines[i + 1] for i in range(0, 120, 2)), encoding="utf-8")
    return path


@pytest.fixture()
def wordpiece(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *PIECES]) + "\n", encoding="utf-8")
    return path


def _bert_config(tmp_path):
    path = tmp_path / "bert.json"
    config = {
        "model_type": "bert",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 37,
        "max_position_embeddings": 32,
    }
    path.write_text(json.dumps(config))
    return path


def _run(*args: str) -> None:
    result = CliRunner().invoke(
        app,
        [
            "pretrain",
            *args,
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--no-progress",
            "--eval-every",
            "0",
            "--no-plot",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)


@pytest.mark.parametrize(
    ("objective", "auto_class"), [("mlm", "AutoModelForMaskedLM"), ("mlm+nsp", "AutoModelForPreTraining")]
)
def test_masked_lm_pretraining_writes_a_folder_transformers_loads(tmp_path, corpus, wordpiece, objective, auto_class):
    import transformers

    out = tmp_path / "out"
    _run(
        "--objective",
        objective,
        "--model-config",
        str(_bert_config(tmp_path)),
        "--tokenizer",
        str(wordpiece),
        "--data",
        str(corpus),
        "--output-dir",
        str(out),
        "--block-size",
        "16",
        "--whole-word-masking",
    )
    theirs = getattr(transformers, auto_class).from_pretrained(out).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours = bunmyaku.from_pretrained(out)
    ids = Tokenizer.from_pretrained(out)(["the cats sat on a mat"], return_tensors="pt")
    assert hf_tokenizer("the cats sat on a mat")["input_ids"] == ids["input_ids"][0].tolist()
    with torch.no_grad():
        expected = (
            theirs(input_ids=ids["input_ids"]).logits
            if objective == "mlm"
            else theirs(input_ids=ids["input_ids"]).prediction_logits
        )
        got = ours(input_ids=ids["input_ids"])
        got = got.logits if objective == "mlm" else got.prediction_logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss"] > 0 and "eval_accuracy" in metrics
    if objective == "mlm+nsp":
        assert "eval_nsp_accuracy" in metrics


def test_causal_lm_with_a_char_tokenizer_and_a_yaml_recipe_then_continued(tmp_path, corpus):
    import transformers

    recipe = tmp_path / "recipe.yaml"
    out = tmp_path / "gpt"
    recipe.write_text(
        "objective: clm\ntokenizer: char\ndoc_split: line\nblock_size: 16\n"
        f"data: [{corpus}]\noutput_dir: {out}\n"
        "model_config: {model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 4, n_positions: 32}\n",
        encoding="utf-8",
    )
    _run("--config", str(recipe))
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    encoded = tokenizer("the cat", return_tensors="pt")
    assert encoded["input_ids"].shape == (1, 7)
    assert model(**encoded).logits.shape == (1, 7, model.config.vocab_size)
    # domain-adaptive pretraining: continue from the exported folder (its tokenizer comes along)
    again = tmp_path / "continued"
    _run(
        "--objective",
        "clm",
        "--init-from",
        str(out),
        "--data",
        str(corpus),
        "--output-dir",
        str(again),
        "--block-size",
        "16",
        "--doc-split",
        "line",
    )
    assert transformers.AutoModelForCausalLM.from_pretrained(again).config.n_embd == 32


def test_unknown_recipe_key_and_missing_model_are_clear_errors(tmp_path, corpus):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        f"objective: clm\ntokenizer: char\ndata: [{corpus}]\nmodel_config: {{model_type: gpt2}}\nlr_max: 1\n"
    )
    result = CliRunner().invoke(app, ["pretrain", "--config", str(recipe)])
    assert result.exit_code == 1 and "lr_max" in result.output
    result = CliRunner().invoke(app, ["pretrain", "--tokenizer", "char", "--data", str(corpus)])
    assert result.exit_code == 1 and "model_config" in result.output


def _gpt_recipe(tmp_path, corpus, out, **extra) -> list[str]:
    config = tmp_path / "gpt.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 32}))
    args = ["--objective", "clm", "--tokenizer", "char", "--doc-split", "line", "--block-size", "16"]
    args += ["--model-config", str(config), "--data", str(corpus), "--output-dir", str(out), "--seed", "0"]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_a_fresh_model_is_reproducible_from_the_seed(tmp_path, corpus):
    from safetensors.torch import load_file

    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        _run(*_gpt_recipe(tmp_path, corpus, out, log_every=1))
    first, second = (load_file(out / "model.safetensors") for out in runs)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert _losses(runs[0]) == _losses(runs[1]) and len(_losses(runs[0])) == 3


def test_rerunning_a_finished_run_keeps_its_evaluation(tmp_path, corpus):
    out = tmp_path / "run"
    _run(*_gpt_recipe(tmp_path, corpus, out))
    before = json.loads((out / "metrics.json").read_text())
    assert "eval_loss" in before
    _run(*_gpt_recipe(tmp_path, corpus, out))  # resumes at the last step: nothing to train
    assert json.loads((out / "metrics.json").read_text()) == before


def test_two_runs_into_one_folder_are_refused(tmp_path, corpus):
    from bunmyaku.training.outputs import OutputDirBusy, exclusive_output_dir

    out = tmp_path / "run"
    with exclusive_output_dir(out):  # another live run holds the folder
        result = CliRunner().invoke(app, ["pretrain", *_gpt_recipe(tmp_path, corpus, out), "--device", "cpu"])
    assert result.exit_code != 0 and "another bunmyaku run" in result.output + str(result.exception)
    assert OutputDirBusy.__name__ in repr(result.exception) or "another bunmyaku run" in result.output
    assert not (out / "model.safetensors").exists() and not (out / "corpus").exists()


@pytest.mark.parametrize("lr", ["inf", "nan"])
def test_a_non_finite_learning_rate_is_refused_before_training(tmp_path, corpus, lr):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["pretrain", *_gpt_recipe(tmp_path, corpus, out, lr=lr), "--device", "cpu"])
    assert result.exit_code != 0 and f"lr must be a finite number, got {lr}" in result.output + str(result.exception)
    assert not (out / "model.safetensors").exists()


def test_python_pretrain_equals_the_command(tmp_path, corpus):
    """bunmyaku.pretrain is the command's twin: same options, same defaults, the same run to the bit."""
    from safetensors.torch import load_file

    cli_out, py_out = tmp_path / "cli", tmp_path / "py"
    _run(*_gpt_recipe(tmp_path, corpus, cli_out))
    config = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 32}
    result = bunmyaku.pretrain(
        objective="clm", tokenizer="char", doc_split="line", block_size=16, model_config=config,
        data=[corpus], output_dir=py_out, seed=0,
        max_steps=3, batch_size=4, progress=False, eval_every=0, plot=False, device="cpu",
    )  # fmt: skip
    assert result.output_dir == py_out and not result.model.training
    cli, py = load_file(cli_out / "model.safetensors"), load_file(py_out / "model.safetensors")
    assert cli.keys() == py.keys() and all(torch.equal(cli[k], py[k]) for k in cli)
    assert _losses(cli_out) == _losses(py_out)
    cli_metrics = json.loads((cli_out / "metrics.json").read_text())
    assert result.metrics["eval_loss"] == cli_metrics["eval_loss"]
    ids = result.tokenizer("the cat", return_tensors="pt")["input_ids"]
    assert result.model(input_ids=ids).logits.shape == (1, ids.shape[1], len(result.tokenizer))


def test_python_pretrain_refuses_unknown_options():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['max_step'\]; did you mean \['max_steps'\]"):
        bunmyaku.pretrain(max_step=3)
    assert "objective" in str(__import__("inspect").signature(bunmyaku.pretrain))


def test_model_configs_and_recipes_read_exponents_as_floats(tmp_path):
    """PyYAML (YAML 1.1) reads ``1e-07`` as a string; a Hugging Face config.json writes its epsilons that way."""
    from bunmyaku.training.pretrain import read_model_config
    from bunmyaku.training.recipe import load_recipe

    as_json = tmp_path / "config.json"
    as_json.write_text(json.dumps({"model_type": "deberta-v2", "layer_norm_eps": 1e-7, "initializer_range": 0.02}))
    assert '"layer_norm_eps": 1e-07' in as_json.read_text()
    as_yaml = tmp_path / "config.yaml"
    as_yaml.write_text("model_type: deberta-v2\nlayer_norm_eps: 1e-7\nname: 1e3x\n")
    assert read_model_config(as_json)["layer_norm_eps"] == 1e-7
    assert read_model_config(as_yaml)["layer_norm_eps"] == 1e-7 and read_model_config(as_yaml)["name"] == "1e3x"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr: 3e-4\nweight_decay: 1.0e-2\nmodel_config: {model_type: bert, layer_norm_eps: 1e-12}\n")
    loaded = load_recipe(recipe)
    assert loaded["lr"] == 3e-4 and loaded["weight_decay"] == 0.01 and loaded["model_config"]["layer_norm_eps"] == 1e-12
    broken = tmp_path / "broken.json"
    broken.write_text('{"model_type": "bert",\n "hidden_size": 32,}')
    with pytest.raises(ValueError, match=r"model config .*broken\.json: .*line 2"):
        read_model_config(broken)


def test_rtd_pretraining_from_a_deberta_config_with_hf_epsilons(tmp_path, corpus, wordpiece):
    """The README's ``--objective rtd`` with a DeBERTa-v3-style config.json, whose layer_norm_eps is 1e-07."""
    import transformers

    config = tmp_path / "deberta.json"
    config.write_text(
        json.dumps(
            {
                "model_type": "deberta-v2",
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 32,
                "relative_attention": True,
                "position_buckets": 8,
                "pos_att_type": ["p2c", "c2p"],
                "position_biased_input": False,
                "norm_rel_ebd": "layer_norm",
                "share_att_key": True,
                "layer_norm_eps": 1e-7,
                "type_vocab_size": 0,
            }
        )
    )
    out = tmp_path / "out"
    _run(
        *("--objective", "rtd", "--model-config", str(config), "--tokenizer", str(wordpiece)),
        *("--data", str(corpus), "--output-dir", str(out), "--block-size", "16", "--generator-layers", "1"),
    )
    theirs = transformers.AutoModel.from_pretrained(out)
    assert theirs.config.layer_norm_eps == 1e-7 and type(theirs).__name__ == "DebertaV2Model"
