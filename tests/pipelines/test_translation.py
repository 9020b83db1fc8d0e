"""translation against transformers' MarianMTModel.generate and MarianTokenizer (greedy and beams).

transformers 5 has no translation pipeline; the reference is its tokenizer, ``generate`` and ``decode``.
"""

from __future__ import annotations

import json

import pytest
import torch

import bunmyaku
from tests.conftest import require_module
from tests.pipelines.tiny_models import MARIAN_TEXT, marian_dir

transformers = require_module("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")


@pytest.fixture(scope="module")
def mt_dir(tmp_path_factory):
    return marian_dir(tmp_path_factory.mktemp("marian"))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_translations_match_transformers(mt_dir, num_beams):
    tokenizer = transformers.MarianTokenizer.from_pretrained(mt_dir)
    model = transformers.MarianMTModel.from_pretrained(mt_dir).eval()
    pipe = bunmyaku.pipeline("translation", model=mt_dir, device="cpu", batch_size=2)
    got = pipe(MARIAN_TEXT, num_beams=num_beams, max_new_tokens=10)
    for text, result in zip(MARIAN_TEXT, got, strict=True):
        ids = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, num_beams=num_beams, max_new_tokens=10, do_sample=False, early_stopping=False)
        assert result["translation_text"] == tokenizer.decode(out[0], skip_special_tokens=True)
    assert pipe(MARIAN_TEXT[0], num_beams=num_beams, max_new_tokens=10) == [got[0]]
    with pytest.raises(ValueError, match="num_beams must be an integer >= 1, got 0"):
        pipe(MARIAN_TEXT[0], num_beams=0)


def test_generation_config_defaults_and_vocab_order(mt_dir, tmp_path):
    # the settings a Helsinki-NLP folder ships in generation_config.json become the defaults
    folder = marian_dir(tmp_path / "configured")
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(num_beams=3, max_length=6, bad_words_ids=[[config["pad_token_id"]]])
    (folder / "generation_config.json").write_text(json.dumps(config))
    pipe = bunmyaku.pipeline("translation", model=folder, device="cpu")
    assert pipe.settings == {"num_beams": 3, "max_new_tokens": 5, "bad_token_ids": [config["pad_token_id"]]}
    assert pipe(MARIAN_TEXT[:2]) == pipe(MARIAN_TEXT[:2], num_beams=3, max_new_tokens=5)
    # ids follow vocab.json, not the SentencePiece model's own numbering, exactly as MarianTokenizer's do
    reordered = marian_dir(tmp_path / "reordered")
    vocab = json.loads((reordered / "vocab.json").read_text())
    first, second = list(vocab)[2:4]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (reordered / "vocab.json").write_text(json.dumps(vocab))
    ours = bunmyaku.pipeline("translation", model=reordered, device="cpu").tokenizer
    theirs = transformers.MarianTokenizer.from_pretrained(reordered)
    for text in MARIAN_TEXT:
        assert ours(text, return_tensors=None)["input_ids"] == theirs(text).input_ids
