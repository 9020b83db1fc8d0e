"""Training new vocabularies; the saved folders load in transformers to the same ids."""

from __future__ import annotations

import json

import pytest

from bunmyaku.tokenization import Tokenizer, train_tokenizer
from bunmyaku.tokenization.training import read_texts
from tests.conftest import require_module

transformers = require_module("transformers", reason="the saved folders are checked with transformers")

ENGLISH = ["The quick brown fox jumps over the lazy dog.", "I can't believe it's not butter!", "  spaced   out  ", ""]


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "byte-bpe", "unigram"])
def test_train_english_kinds_load_in_transformers(data, tmp_path, kind):
    folder = tmp_path / kind
    tokenizer = train_tokenizer([data / "botchan-en" / "botchan.txt"], kind, 800, output_dir=folder)
    assert 700 <= len(tokenizer) <= 800
    ids = tokenizer(ENGLISH, return_tensors=None)["input_ids"]
    assert transformers.AutoTokenizer.from_pretrained(folder)(ENGLISH)["input_ids"] == ids
    assert Tokenizer.from_pretrained(folder)(ENGLISH, return_tensors=None)["input_ids"] == ids
    decoded = tokenizer.decode(tokenizer.encode("The quick brown fox."), skip_special_tokens=True)
    assert decoded.lower().replace(" ", "") == "thequickbrownfox."


def test_byte_bpe_round_trips_any_text(data, tmp_path, fixture_strings):
    tokenizer = train_tokenizer([data / "tinyshakespeare" / "input.txt"], "byte-bpe", 500)
    for text in fixture_strings[:60]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_japanese_unigram_option(data, tmp_path):
    tokenizer = train_tokenizer([data / "aozora" / "lemon.txt"], "unigram", 3000, output_dir=tmp_path)
    text = "檸檬を一つ買った。"
    ids = tokenizer.encode(text)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert transformers.AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == ids


def test_mecab_wordpiece_keeps_words(japanese_dir):
    config = json.loads((japanese_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "BertJapaneseTokenizer" and config["word_tokenizer_type"] == "mecab"
    tokenizer = Tokenizer.from_pretrained(japanese_dir)
    words = []
    for token in tokenizer.tokenize("先生は言った。"):
        if token.startswith("##"):
            words[-1] += token[2:]
        else:
            words.append(token)
    assert words == ["先生", "は", "言っ", "た", "。"]  # WordPiece never crosses a MeCab word boundary


def test_read_texts_from_structured_files(data):
    jsts = read_texts({"path": data / "jglue" / "jsts" / "valid.jsonl", "fields": ["sentence1", "sentence2"]})
    assert len(jsts) == 2 * 1457
    contexts = read_texts({"path": data / "jglue" / "jsquad" / "valid.json", "fields": ["context"]})
    assert contexts and all("[SEP]" in c for c in contexts[:5])
    ner = read_texts({"path": data / "ja-wikipedia-ner" / "ner.json", "fields": ["text"]})
    assert len(ner) == 5343
    agnews = read_texts({"path": data / "agnews" / "dev.tsv", "fields": [0]})
    rows = [r for r in (data / "agnews" / "dev.tsv").read_text(encoding="utf-8").split("\n") if r.strip()]
    assert len(agnews) == len(rows) and agnews[0] == rows[0].split("\t")[0]


@pytest.mark.parametrize("style", [None, "deberta"])
def test_a_vocabulary_the_text_cannot_fill_is_warned_about(tmp_path, caplog, style):
    corpus = tmp_path / "labels.txt"
    corpus.write_text("World\nSports\nBusiness\nSci/Tech\n" * 50, encoding="utf-8")
    with caplog.at_level("WARNING", logger="bunmyaku"):
        tokenizer = train_tokenizer([corpus], "unigram", 8000, style=style)
    assert len(tokenizer) < 100
    assert f"has {len(tokenizer)} tokens, fewer than the vocab_size 8000 asked: 200 texts" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="bunmyaku"):
        train_tokenizer([corpus], "unigram", len(tokenizer), style=style)
    assert "fewer than the vocab_size" not in caplog.text
