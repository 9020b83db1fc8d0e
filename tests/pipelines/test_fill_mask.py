"""fill-mask against transformers' pipeline on the same random masked-LM and tokenizer."""

from __future__ import annotations

import shutil

import pytest
import torch

import bunmyaku
from tests.conftest import require_module
from tests.parity.helpers import randomize

transformers = require_module("transformers")


@pytest.fixture(scope="module")
def mlm_dir(minilm_dir, tmp_path_factory):
    """A random BERT masked LM on MiniLM's real vocabulary and tokenizer files."""
    path = tmp_path_factory.mktemp("mlm")
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    torch.manual_seed(0)
    randomize(transformers.BertForMaskedLM(config), seed=0, scale=0.5).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, path / name)
    return path


def test_fill_mask_matches_transformers(mlm_dir):
    ours = bunmyaku.pipeline("fill-mask", model=mlm_dir, device="cpu")
    theirs = transformers.pipeline("fill-mask", model=str(mlm_dir), device="cpu")
    for text in ["Paris is the [MASK] of France.", "the cat sat on the [MASK]."]:
        got, expected = ours(text, top_k=5), theirs(text, top_k=5)
        assert [p["token"] for p in got] == [p["token"] for p in expected]
        assert [p["token_str"] for p in got] == [p["token_str"] for p in expected]
        assert [p["sequence"] for p in got] == [p["sequence"] for p in expected]
        for a, b in zip(got, expected, strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_fill_mask_several_masks_and_errors(mlm_dir):
    pipe = bunmyaku.pipeline("fill-mask", model=mlm_dir, device="cpu", top_k=3)
    two = pipe("[MASK] is the capital of [MASK].")
    assert len(two) == 2 and all(len(slot) == 3 for slot in two)
    assert all(slot[0]["score"] >= slot[1]["score"] for slot in two)
    assert len(pipe(["a [MASK] b", "c [MASK] d"])) == 2
    with pytest.raises(ValueError, match="no \\[MASK\\] token"):
        pipe("nothing to fill")


def test_a_long_text_keeps_the_window_around_its_mask(mlm_dir):
    """A text past the model's 512 tokens is cut to the 510 content tokens centred on the mask; the predictions
    are transformers' on that window."""
    pipe = bunmyaku.pipeline("fill-mask", model=mlm_dir, device="cpu", top_k=3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(mlm_dir)
    model = transformers.BertForMaskedLM.from_pretrained(mlm_dir).eval()
    text = " ".join(["one"] * 400 + ["[MASK]"] + ["two"] * 450)
    ids = tokenizer(text)["input_ids"]
    content, mask = ids[1:-1], ids.index(tokenizer.mask_token_id) - 1
    start = mask - (510 - 1) // 2
    window = [ids[0], *content[start : start + 510], ids[-1]]
    assert len(ids) > 512 and len(window) == 512 and tokenizer.mask_token_id in window
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([window])).logits[0, window.index(tokenizer.mask_token_id)]
    expected = logits.softmax(-1).topk(3)
    got = pipe(text)
    assert [p["token"] for p in got] == expected.indices.tolist()
    assert [p["score"] for p in got] == pytest.approx(expected.values.tolist(), abs=1e-5)
    near_the_end = " ".join(["one"] * 900 + ["[MASK]", "two"])
    assert len(pipe(near_the_end)) == 3  # the window stops at the text's end
    with pytest.raises(ValueError, match="more than the model's limit of 512 tokens"):
        pipe(" ".join(["[MASK]"] + ["one"] * 600 + ["[MASK]"]))
    with pytest.raises(ValueError, match="top_k must be an integer >= 1, got 0"):
        pipe("a [MASK].", top_k=0)
