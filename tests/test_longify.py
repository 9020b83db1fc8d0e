"""``bunmyaku longify``: a BERT / RoBERTa turned into a Longformer that ``transformers`` loads, computing what the
source computed while the window covers the input, and continuing pretraining from there."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import bunmyaku
from bunmyaku.cli import app
from bunmyaku.models.longify import longify
from tests.conftest import require_module
from tests.parity.helpers import assert_close, randomize, save

transformers = require_module("transformers")

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
SOURCE_POSITIONS = 20  # real positions of the tiny sources
WORDS = ["the", "cat", "dog", "sat", "on", "mat", "ran", "to", "a", "park", "big", "small", "red"]


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    config = transformers.RobertaConfig(
        **TINY, max_position_embeddings=SOURCE_POSITIONS + 2, pad_token_id=1, bos_token_id=0, eos_token_id=2
    )
    torch.manual_seed(0)
    return save(randomize(transformers.RobertaForMaskedLM(config), seed=1), tmp_path_factory.mktemp("roberta"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    config = transformers.BertConfig(**TINY, max_position_embeddings=SOURCE_POSITIONS, pad_token_id=0)
    torch.manual_seed(0)
    return save(randomize(transformers.BertForMaskedLM(config), seed=2), tmp_path_factory.mktemp("bert"))


def _ids(length: int, seed: int, batch: int = 2, first: int = 0) -> torch.Tensor:
    """Random ids after a ``first`` token (RoBERTa's ``<s>``; a BERT's pad is 0, so it gets another id)."""
    ids = torch.randint(3, 99, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = first
    return ids


def test_long_input_matches_transformers_longformer(roberta_dir, tmp_path):
    out = longify(roberta_dir, tmp_path / "long", max_length=64, attention_window=[8, 16])
    theirs = transformers.LongformerForMaskedLM.from_pretrained(out).eval()
    assert theirs.config.max_position_embeddings == 66 and theirs.config.attention_window == [8, 16]
    ours = bunmyaku.from_pretrained(out)
    ids = _ids(57, seed=3)
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    ids[1, 40:] = 1
    glob = torch.zeros_like(ids)
    glob[:, 0] = 1
    with torch.no_grad():
        for g in (None, glob):
            expected = theirs(input_ids=ids, attention_mask=mask, global_attention_mask=g).logits
            assert_close(ours(input_ids=ids, attention_mask=mask, global_attention_mask=g).logits, expected, mask)


@pytest.mark.parametrize("kind", ["roberta", "bert"])
def test_short_input_equals_the_source(roberta_dir, bert_dir, tmp_path, kind):
    """A window covering the input (one-sided 16 >= T - 1) and global copies of q/k/v: the source's logits."""
    source_dir = roberta_dir if kind == "roberta" else bert_dir
    out = longify(source_dir, tmp_path / "long", max_length=48, attention_window=32)
    source = transformers.AutoModelForMaskedLM.from_pretrained(source_dir).eval()
    theirs = transformers.LongformerForMaskedLM.from_pretrained(out).eval()
    ours = bunmyaku.from_pretrained(out)
    ids = _ids(15, seed=4, first=0 if kind == "roberta" else 2)
    glob = torch.zeros_like(ids)
    glob[:, 0] = 1
    with torch.no_grad():
        expected = source(input_ids=ids).logits
        for g in (None, glob):  # a global <s> reads through the copied projections: still the same
            assert_close(ours(input_ids=ids, global_attention_mask=g).logits, expected)
            assert_close(theirs(input_ids=ids, global_attention_mask=g).logits, expected)


@pytest.mark.parametrize("kind", ["roberta", "bert"])
def test_positions_are_copied_over_and_over(roberta_dir, bert_dir, tmp_path, kind):
    from safetensors.torch import load_file

    source_dir = roberta_dir if kind == "roberta" else bert_dir
    out = longify(source_dir, tmp_path / "long", max_length=50, attention_window=8)
    old = load_file(source_dir / "model.safetensors")[f"{kind}.embeddings.position_embeddings.weight"]
    new = load_file(out / "model.safetensors")["longformer.embeddings.position_embeddings.weight"]
    pad = 1 if kind == "roberta" else 0
    start = pad + 1 if kind == "roberta" else 0  # the source's first real position's row
    assert new.shape == (50 + pad + 1, 32)
    assert torch.equal(new[: pad + 1], old[: pad + 1])
    for position in range(50):  # real position p of the long model = real position p mod 20 of the source
        assert torch.equal(new[pad + 1 + position], old[start + position % SOURCE_POSITIONS]), position
    assert not torch.equal(new[pad + 1 + 25], new[pad + 1 + 24])  # not one row repeated


def test_only_the_trained_positions_are_copied_when_asked(bert_dir, tmp_path):
    """``--trained-length 8`` (a source pretrained on 8-token inputs): position p starts as the source's p mod 8, and
    an input of up to 8 tokens still gets the source's outputs."""
    from safetensors.torch import load_file

    result = CliRunner().invoke(
        app,
        ["longify", "--model", str(bert_dir), "--max-length", "40", "--attention-window", "16"]
        + ["--trained-length", "8", "--output-dir", str(tmp_path / "long")],
    )
    assert result.exit_code == 0, result.output
    old = load_file(bert_dir / "model.safetensors")["bert.embeddings.position_embeddings.weight"]
    new = load_file(tmp_path / "long" / "model.safetensors")["longformer.embeddings.position_embeddings.weight"]
    assert new.shape == (41, 32) and torch.equal(new[0], old[0])  # BERT's pad 0: row 0, then the 40 positions
    for position in range(40):
        assert torch.equal(new[1 + position], old[position % 8]), position
    ids = _ids(8, seed=3, first=5)
    source, long = (bunmyaku.from_pretrained(d).eval() for d in (bert_dir, tmp_path / "long"))
    with torch.no_grad():
        assert_close(long(input_ids=ids).logits, source(input_ids=ids).logits)
    for bad in ("0", "21"):
        result = CliRunner().invoke(
            app, ["longify", "--model", str(bert_dir), "--trained-length", bad, "--output-dir", str(tmp_path / bad)]
        )
        assert result.exit_code == 1 and f"trained_length {bad}" in result.output and "20 positions" in result.output
        assert not (tmp_path / bad).exists()


def test_global_projections_are_copies(roberta_dir, tmp_path):
    from safetensors.torch import load_file

    state = load_file(longify(roberta_dir, tmp_path / "long", max_length=40, attention_window=8) / "model.safetensors")
    for layer in range(2):
        for name in ("query", "key", "value"):
            for part in ("weight", "bias"):
                base = f"longformer.encoder.layer.{layer}.attention.self.{name}"
                assert torch.equal(state[f"{base}_global.{part}"], state[f"{base}.{part}"])


def test_cli_then_three_steps_of_continued_pretraining(tmp_path):
    from bunmyaku.tokenization import train_tokenizer

    corpus = tmp_path / "corpus.txt"
    lines = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(20 + i % 9)) for i in range(60)]
    corpus.write_text("\n\n".join(lines), encoding="utf-8")
    tokenizer = train_tokenizer([corpus], kind="wordpiece", vocab_size=40, min_frequency=1, model_max_length=16)
    source = tmp_path / "bert"
    config = transformers.BertConfig(**{**TINY, "vocab_size": len(tokenizer)}, max_position_embeddings=16)
    save(transformers.BertForMaskedLM(config), source)
    tokenizer.save_pretrained(source)
    long_dir = tmp_path / "long"
    runner = CliRunner()
    args = ["longify", "--model", str(source), "--max-length", "64", "--attention-window", "8"]
    result = runner.invoke(app, [*args, "--output-dir", str(long_dir)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads((long_dir / "tokenizer_config.json").read_text())["model_max_length"] == 64
    assert transformers.AutoTokenizer.from_pretrained(long_dir).model_max_length == 64
    long_config = transformers.AutoConfig.from_pretrained(long_dir)
    assert long_config.model_type == "longformer" and long_config.sep_token_id == tokenizer.sep_token_id == 3
    again = tmp_path / "continued"
    result = runner.invoke(
        app,
        [
            "pretrain",
            "--objective",
            "mlm",
            "--init-from",
            str(long_dir),
            "--data",
            str(corpus),
            "--output-dir",
            str(again),
            "--block-size",
            "40",  # past the source's 16 positions
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--no-progress",
            "--eval-every",
            "0",
            "--no-plot",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    trained = transformers.LongformerForMaskedLM.from_pretrained(again)
    before = transformers.LongformerForMaskedLM.from_pretrained(long_dir)
    assert not torch.equal(trained.lm_head.dense.weight, before.lm_head.dense.weight)  # it did train


def test_bad_inputs_are_one_clear_error(roberta_dir, tmp_path):
    gpt = save(transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4)), tmp_path / "g")
    runner = CliRunner()
    result = runner.invoke(app, ["longify", "--model", str(gpt), "--output-dir", str(tmp_path / "o1")])
    assert result.exit_code == 1 and "model_type 'gpt2'" in result.output and "BERT or RoBERTa" in result.output
    result = runner.invoke(
        app, ["longify", "--model", str(roberta_dir), "--max-length", "10", "--output-dir", str(tmp_path / "o2")]
    )
    assert result.exit_code == 1 and "max_length 10" in result.output and "20 positions" in result.output
    result = runner.invoke(
        app,
        ["longify", "--model", str(roberta_dir), "--max-length", "64", "--attention-window", "7"]
        + ["--output-dir", str(tmp_path / "o3")],
    )
    assert result.exit_code == 1 and "attention_window" in result.output
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
