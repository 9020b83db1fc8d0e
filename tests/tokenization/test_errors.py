"""Bad input gives clear, actionable errors."""

from __future__ import annotations

import json

import pytest

from bunmyaku.tokenization import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def bert(minilm_dir):
    return Tokenizer.from_pretrained(minilm_dir)


def test_none_in_batch(bert):
    with pytest.raises(TypeError, match=r"text\[1\] is NoneType"):
        bert(["fine", None])


def test_non_string_items(bert):
    with pytest.raises(TypeError, match=r"text\[0\] is int"):
        bert([3, "x"])
    with pytest.raises(TypeError, match="text_pair"):
        bert(["a"], [b"bytes"])
    with pytest.raises(TypeError, match="must be a str"):
        bert(42)


def test_empty_batch_and_mismatched_pairs(bert):
    with pytest.raises(ValueError, match="empty batch"):
        bert([])
    with pytest.raises(ValueError, match="text_pair has 1"):
        bert(["a", "b"], ["c"])


def test_unequal_lengths_need_padding(bert):
    with pytest.raises(ValueError, match="padding=True"):
        bert(["short", "a much longer text than that"], return_tensors="pt")


def test_bad_options(bert):
    with pytest.raises(ValueError, match="padding must be"):
        bert("x", padding="sideways")
    with pytest.raises(ValueError, match="truncation must be"):
        bert("x", truncation="middle")
    with pytest.raises(ValueError, match="padding_side"):
        bert("x", padding=True, padding_side="up")


def test_padding_without_pad_token(gpt2_original):
    tokenizer = Tokenizer.from_pretrained(gpt2_original)
    with pytest.raises(ValueError, match="no pad token"):
        tokenizer(["a", "b c"], padding=True)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="expected tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges"):
        Tokenizer.from_pretrained(tmp_path)


def test_malformed_files(tmp_path):
    bad_json = tmp_path / "json"
    bad_json.mkdir()
    (bad_json / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_pretrained(bad_json)

    empty_vocab = tmp_path / "vocab"
    empty_vocab.mkdir()
    (empty_vocab / "vocab.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        Tokenizer.from_pretrained(empty_vocab)

    bpe = tmp_path / "bpe"
    bpe.mkdir()
    (bpe / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (bpe / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match=r"merges.txt:2: a merge is two symbols"):
        Tokenizer.from_pretrained(bpe)
    (bpe / "merges.txt").write_bytes(b"#version: 0.2\na \xe9\n")
    with pytest.raises(ValueError, match=r"merges.txt is not UTF-8 \(byte offset 16\)"):
        Tokenizer.from_pretrained(bpe)
    (bpe / "vocab.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        Tokenizer.from_pretrained(bpe)

    config = tmp_path / "config"
    config.mkdir()
    (config / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
    (config / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer_config.json is not a valid JSON"):
        Tokenizer.from_pretrained(config)

    with pytest.raises(ValueError, match="not a SentencePiece model"):
        (tmp_path / "bad.model").write_bytes(b"\xff\x00garbage")
        Tokenizer.from_pretrained(tmp_path / "bad.model")
    with pytest.raises(ValueError, match="GGUF"):
        (tmp_path / "bad.gguf").write_bytes(b"GGUF but not really")
        Tokenizer.from_gguf(tmp_path / "bad.gguf")


def test_vocab_without_template_tokens(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    with pytest.raises(ValueError, match=r"'\[CLS\]' is not in the vocabulary"):
        Tokenizer.from_pretrained(tmp_path)


def test_non_utf8_training_file_names_file_and_offset(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("fine text\n", encoding="utf-8")
    bad = tmp_path / "shift_jis.txt"
    bad.write_bytes(b"abc " + "日本語".encode("shift_jis"))
    with pytest.raises(ValueError, match=r"shift_jis.txt is not valid UTF-8: byte offset 4"):
        train_tokenizer([good, bad], "wordpiece", 100)


def test_training_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_tokenizer([tmp_path / "missing.txt"], "bpe", 100)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="No text to train on"):
        train_tokenizer([empty], "bpe", 100)
    with pytest.raises(ValueError, match="kind must be one of"):
        train_tokenizer([empty], "sentencepiece", 100)
    with pytest.raises(ValueError, match="byte-level"):
        train_tokenizer([empty], "byte-bpe", 100, pre_tokenizer="mecab")


def test_chat_template_missing(bert):
    with pytest.raises(ValueError, match="no chat template"):
        bert.apply_chat_template([{"role": "user", "content": "hi"}])
