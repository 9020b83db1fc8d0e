"""Ids, offsets and decoded text identical to `transformers` on every fixture string, single and paired."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from bunmyaku.tokenization import Tokenizer
from tests.conftest import require_module

transformers = require_module("transformers", reason="parity tests compare against transformers")

FAST_KEYS = ("input_ids", "token_type_ids", "attention_mask", "offset_mapping")


def _assert_same_encodings(ours: Tokenizer, theirs, texts, pairs=None, offsets=True) -> None:
    kwargs = {"return_offsets_mapping": offsets}
    a = ours(texts, pairs, return_tensors=None, return_token_type_ids=True, **kwargs)
    b = theirs(texts, pairs, return_token_type_ids=True, **kwargs)
    for key in FAST_KEYS if offsets else FAST_KEYS[:3]:
        for index, (mine, reference) in enumerate(zip(a[key], b[key], strict=True)):
            assert (
                list(map(tuple, mine)) == list(map(tuple, reference)) if key == "offset_mapping" else mine == reference
            ), f"{key} differs on {texts[index]!r:.80}"
    for ids in a["input_ids"]:
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


@pytest.fixture(scope="module")
def families(minilm_dir, gpt2_original, gpt2_hf_dir, roberta_dir, smollm_gguf):
    """(bunmyaku tokenizer, transformers tokenizer) for each family that has a fast reference."""
    auto = transformers.AutoTokenizer
    return {
        "minilm-wordpiece": (Tokenizer.from_pretrained(minilm_dir), auto.from_pretrained(minilm_dir)),
        "gpt2-encoder-json": (Tokenizer.from_pretrained(gpt2_original), auto.from_pretrained(gpt2_hf_dir)),
        "roberta": (Tokenizer.from_pretrained(roberta_dir), auto.from_pretrained(roberta_dir)),
        "smollm2-gguf": (
            Tokenizer.from_pretrained(smollm_gguf),
            auto.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name),
        ),
    }


@pytest.mark.parametrize("family", ["minilm-wordpiece", "gpt2-encoder-json", "roberta", "smollm2-gguf"])
def test_single_texts_match_transformers(families, family, fixture_strings):
    ours, theirs = families[family]
    _assert_same_encodings(ours, theirs, fixture_strings)


@pytest.mark.parametrize("family", ["minilm-wordpiece", "gpt2-encoder-json", "roberta", "smollm2-gguf"])
def test_pairs_match_transformers(families, family, fixture_pairs):
    ours, theirs = families[family]
    first, second = (list(side) for side in zip(*fixture_pairs, strict=True))
    _assert_same_encodings(ours, theirs, first, second)


def test_roberta_uses_its_template(families):
    ours, _ = families["roberta"]
    ids = ours("a", "b", return_tensors=None)["input_ids"]
    s, e = ours.convert_tokens_to_ids(["<s>", "</s>"])
    assert ids[0] == s and ids[-1] == e and ids.count(e) == 3  # <s> a </s></s> b </s>


def test_gguf_chat_template_matches_transformers(families):
    ours, theirs = families["smollm2-gguf"]
    messages = [{"role": "user", "content": "What is 文脈?"}, {"role": "assistant", "content": "Context."}]
    for prompt in (True, False):
        expected = theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
        assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == expected
    ids = ours.apply_chat_template(messages, tokenize=True)
    assert ids == theirs(ours.apply_chat_template(messages), add_special_tokens=False)["input_ids"]


def test_gguf_special_tokens(families):
    ours, theirs = families["smollm2-gguf"]
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (theirs.bos_token, theirs.eos_token, theirs.pad_token)
    assert ours.eos_token_id == theirs.eos_token_id and len(ours) == len(theirs)


def _check_japanese_offsets(tokenizer: Tokenizer, text: str, encoding: dict) -> None:
    """HF returns no offsets, so check each token against the characters its offsets point at."""
    previous_end = 0
    for token, (start, end) in zip(
        tokenizer.convert_ids_to_tokens(encoding["input_ids"]), encoding["offset_mapping"], strict=True
    ):
        if token in tokenizer.all_special_tokens:
            continue
        assert 0 <= start < end <= len(text) and start >= previous_end - 1, (token, start, end)
        span = unicodedata.normalize("NFKC", text[start:end])
        assert token.removeprefix("##") in span, f"{token!r} at {start}:{end} is {span!r} in {text!r:.60}"
        previous_end = end


@pytest.fixture(scope="module")
def japanese(japanese_dir):
    return Tokenizer.from_pretrained(japanese_dir), transformers.BertJapaneseTokenizer.from_pretrained(japanese_dir)


def test_japanese_ids_match_bert_japanese(japanese, fixture_strings):
    ours, theirs = japanese
    encoded = ours(fixture_strings, return_tensors=None, return_offsets_mapping=True)
    for index, text in enumerate(fixture_strings):
        expected = theirs(text)["input_ids"]
        assert encoded["input_ids"][index] == expected, f"ids differ on {text!r:.80}"
        _check_japanese_offsets(ours, text, {k: v[index] for k, v in encoded.items()})
        assert ours.decode(expected) == theirs.decode(expected)
        assert ours.decode(expected, skip_special_tokens=True) == theirs.decode(expected, skip_special_tokens=True)


def test_japanese_pairs_match_bert_japanese(japanese, fixture_pairs):
    ours, theirs = japanese
    for first, second in fixture_pairs:
        mine = ours(first, second, return_tensors=None)
        reference = theirs(first, second)
        assert mine["input_ids"] == reference["input_ids"], f"ids differ on {first!r:.40} / {second!r:.40}"
        assert mine["token_type_ids"] == reference["token_type_ids"]


def test_japanese_offsets_point_into_the_original_string(japanese):
    ours, _ = japanese
    text = "ﾃﾞｽﾏｽ調で、全角ＡＢＣと　先生。ｶﾞｷﾞ"
    encoded = ours(text, return_tensors=None, return_offsets_mapping=True)
    spans = [(s, e) for s, e in encoded["offset_mapping"] if e > s]
    # Contiguous spans from the first to the last character, voiced half-width marks (ﾞ) included.
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    covered = "".join(unicodedata.normalize("NFKC", text[s:e]) for s, e in spans)
    assert covered == unicodedata.normalize("NFKC", text).replace(" ", "")
    _check_japanese_offsets(ours, text, encoded)


def test_japanese_character_level_matches_bert_japanese(data: Path, tmp_path, fixture_strings):
    from bunmyaku.tokenization import train_tokenizer

    folder = tmp_path / "char"
    train_tokenizer([data / "aozora" / "hashire_merosu.txt"], "character", 1000, output_dir=folder)
    ours = Tokenizer.from_pretrained(folder)
    theirs = transformers.BertJapaneseTokenizer.from_pretrained(folder)
    assert theirs.subword_tokenizer_type == "character"
    sample = [s for s in fixture_strings if len(s) < 1000]
    encoded = ours(sample, return_tensors=None, return_offsets_mapping=True)
    for index, text in enumerate(sample):
        assert encoded["input_ids"][index] == theirs(text)["input_ids"], f"ids differ on {text!r:.80}"
