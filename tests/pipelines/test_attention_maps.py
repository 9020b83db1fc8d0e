"""``bunmyaku attention`` and ``attention_maps``: one PNG per layer, one panel per head, one-line errors."""

from __future__ import annotations

import sys

import pytest
import torch
from typer.testing import CliRunner

import bunmyaku
from bunmyaku.cli import app
from tests.conftest import require_module
from tests.parity.helpers import randomize
from tests.pipelines.tiny_models import bert_head_dir, marian_dir

transformers = require_module("transformers")
require_module("matplotlib")
runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bert_dir(minilm_dir, tmp_path_factory):
    return bert_head_dir(tmp_path_factory.mktemp("bert"), minilm_dir, "BertForSequenceClassification")


@pytest.fixture(scope="module")
def gpt2_dir(shared_data, tmp_path_factory):
    """3 layers of 6 heads: a grid with a ragged last row."""
    path = tmp_path_factory.mktemp("gpt2")
    bunmyaku.Tokenizer.from_pretrained(shared_data / "gpt2-tokenizer").save_pretrained(path)
    config = transformers.GPT2Config(vocab_size=50257, n_embd=36, n_layer=3, n_head=6, n_positions=64)
    torch.manual_seed(0)
    randomize(transformers.GPT2LMHeadModel(config), seed=0, scale=0.5).save_pretrained(path)
    return path


def _pngs(folder):
    return sorted(p.name for p in folder.glob("*.png"))


@pytest.mark.parametrize("which, layers, heads", [("bert", 2, 4), ("gpt2", 3, 6)])
def test_the_verb_writes_one_grid_per_layer(request, tmp_path, which, layers, heads):
    folder = request.getfixturevalue(f"{which}_dir")
    out = tmp_path / "maps"
    result = runner.invoke(app, ["attention", "--model", str(folder), "--output-dir", str(out), "the cat sat down"])
    assert result.exit_code == 0, result.output
    assert f"{layers} layers x {heads} heads" in result.output
    assert _pngs(out) == [f"layer_{i:02d}.png" for i in range(layers)]
    for file in out.glob("*.png"):
        assert file.read_bytes()[:8] == PNG and file.stat().st_size > 1000


def test_the_panels_are_the_heads_weights(gpt2_dir, tmp_path):
    from bunmyaku.pipelines.attention_maps import attention_maps, draw_layer

    tokenizer = bunmyaku.Tokenizer.from_pretrained(gpt2_dir)
    model = bunmyaku.from_pretrained(gpt2_dir)
    maps = attention_maps(model, "Attention is a soft look-up", tmp_path, tokenizer=tokenizer)
    T = len(maps.tokens)
    assert maps.tokens == tokenizer.convert_ids_to_tokens(tokenizer.encode("Attention is a soft look-up"))
    assert len(maps.attentions) == 3 and len(maps.files) == 3
    ids = torch.tensor([tokenizer.encode("Attention is a soft look-up")])
    with torch.no_grad():
        expected = model(input_ids=ids, output_attentions=True).attentions
    for layer, weights in enumerate(maps.attentions):
        assert weights.shape == (6, T, T)
        torch.testing.assert_close(weights, expected[layer][0])
        assert weights.triu(1).abs().max() == 0  # causal: no query looks at a later key
    fig = draw_layer(maps.attentions[1], maps.tokens, "layer 1")
    panels = [ax for ax in fig.axes if ax.images and ax.get_title().startswith("head")]
    assert [ax.get_title() for ax in panels] == [f"head {h}" for h in range(6)]
    for h, ax in enumerate(panels):
        assert [t.get_text() for t in ax.get_xticklabels()] == maps.tokens
        torch.testing.assert_close(torch.as_tensor(ax.images[0].get_array()), maps.attentions[1][h])


def test_long_texts_are_truncated_to_max_length(bert_dir, tmp_path):
    from bunmyaku.pipelines.attention_maps import attention_maps

    maps = attention_maps(bert_dir, "word " * 40, tmp_path, max_length=8, device="cpu")
    assert len(maps.tokens) == 8 and maps.attentions[0].shape == (4, 8, 8)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no/such/folder/x", "some text"], "no/such/folder/x"),
        (["--model", "{bert}", "   "], "the text is empty"),
        (["--model", "{bert}", "--max-length", "1", "text"], "max_length must be an integer >= 2"),
    ],
)
def test_errors_are_one_line(bert_dir, tmp_path, args, message):
    args = [a.replace("{bert}", str(bert_dir)) for a in args]
    result = runner.invoke(app, ["attention", "--output-dir", str(tmp_path / "o"), *args])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not (tmp_path / "o").exists() or not _pngs(tmp_path / "o")


def test_an_encoder_decoder_is_refused_in_one_line(tmp_path):
    folder = marian_dir(tmp_path / "marian")
    result = runner.invoke(app, ["attention", "--model", str(folder), "-o", str(tmp_path / "o"), "the cat"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "is an encoder-decoder model; attention maps are drawn for encoder-only" in result.output


def test_a_model_is_required():
    result = runner.invoke(app, ["attention", "some text"])
    assert result.exit_code == 2 and "--model" in result.output


def test_without_matplotlib_the_error_names_the_extra(bert_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    result = runner.invoke(app, ["attention", "--model", str(bert_dir), "-o", str(tmp_path / "o"), "some text"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == "error: drawing attention maps needs matplotlib: pip install 'bunmyaku[train]'"
