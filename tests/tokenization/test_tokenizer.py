"""Padding, truncation, windows, masks, tensors, decoding, special tokens and saving, checked against transformers."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from bunmyaku.tokenization import Tokenizer
from tests.conftest import require_module

transformers = require_module("transformers", reason="these tests compare against transformers")

TEXTS = ["Hello world, this is a longer sentence than the others.", "Short one.", "", "日本語の文も。"]
PAIRS = ["A question?", "Another, much longer second segment of text here.", "x", "です"]


@pytest.fixture(scope="module")
def bert(minilm_dir):
    return Tokenizer.from_pretrained(minilm_dir), transformers.AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def gpt2(gpt2_hf_dir):
    return Tokenizer.from_pretrained(gpt2_hf_dir), transformers.AutoTokenizer.from_pretrained(gpt2_hf_dir)


def _same(ours: Tokenizer, theirs, *args, **kwargs) -> dict:
    mine = ours(*args, **kwargs)
    reference = theirs(*args, **kwargs)
    assert set(mine) == set(reference), (set(mine), set(reference))
    for key, value in reference.items():
        assert torch.equal(mine[key], value), key
    return mine


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("padding", [True, "longest", "max_length"])
def test_padding_matches_transformers(bert, side, padding):
    ours, theirs = bert
    ours.padding_side = theirs.padding_side = side
    try:
        out = _same(ours, theirs, TEXTS, padding=padding, max_length=24, return_tensors="pt")
    finally:
        ours.padding_side = theirs.padding_side = "right"
    assert out["input_ids"].shape[0] == len(TEXTS)
    pad_column = 0 if side == "left" else -1
    assert out["attention_mask"][1, pad_column] == 0


@pytest.mark.parametrize("strategy", ["longest_first", "only_first", "only_second"])
def test_truncation_strategies_match_transformers(bert, strategy):
    ours, theirs = bert
    first = [f"first segment number {i} " * (i + 3) for i in range(4)]
    second = [f"second part {i} " * (10 - i) for i in range(4)]
    out = _same(ours, theirs, first, second, truncation=strategy, max_length=40, padding=True, return_tensors="pt")
    assert out["input_ids"].shape[1] == 40
    if strategy != "longest_first":
        with pytest.raises(ValueError, match="too short"):
            ours(["a"], ["b"], truncation=strategy, max_length=4)


def test_truncation_with_max_length_only(gpt2):
    ours, theirs = gpt2
    assert ours(TEXTS[0], max_length=5, return_tensors=None)["input_ids"] == theirs(TEXTS[0], max_length=5)["input_ids"]


def test_sliding_windows_match_transformers(bert):
    ours, theirs = bert
    long = ["word " * 50 + "end", "short", "mid " * 20]
    kwargs = dict(max_length=16, stride=4, truncation=True, return_overflowing_tokens=True, padding=True)
    out = _same(ours, theirs, long, return_offsets_mapping=True, return_tensors="pt", **kwargs)
    mapping = out["overflow_to_sample_mapping"].tolist()
    assert mapping[0] == 0 and mapping.count(0) > 1 and 1 in mapping
    # Consecutive windows of one sample overlap by `stride` tokens.
    first, second = out["input_ids"][0], out["input_ids"][1]
    assert first[-5:-1].tolist() == second[1:5].tolist()


def test_question_context_windows_match_transformers(bert):
    ours, theirs = bert
    kwargs = dict(
        truncation="only_second", max_length=20, stride=5, return_overflowing_tokens=True, padding="max_length"
    )
    _same(ours, theirs, ["Who?"], ["context " * 40], return_offsets_mapping=True, return_tensors="pt", **kwargs)


def test_special_tokens_mask_matches_transformers(bert, gpt2):
    for ours, theirs in (bert, gpt2):
        if theirs.pad_token is None:
            _same(ours, theirs, TEXTS[0], PAIRS[0], return_special_tokens_mask=True, return_tensors="pt")
        else:
            _same(ours, theirs, TEXTS, PAIRS, padding=True, return_special_tokens_mask=True, return_tensors="pt")


def test_pad_to_multiple_of(bert):
    ours, _ = bert
    assert ours(TEXTS, padding=True, pad_to_multiple_of=8, return_tensors="pt")["input_ids"].shape[1] % 8 == 0


def test_tensor_shapes_and_types(bert):
    ours, _ = bert
    out = ours(TEXTS, padding=True, return_offsets_mapping=True, return_tensors="pt")
    batch, length = out["input_ids"].shape
    assert batch == len(TEXTS) and out["input_ids"].dtype == torch.long
    assert out["offset_mapping"].shape == (batch, length, 2)
    assert list(out) == ["input_ids", "token_type_ids", "attention_mask", "offset_mapping"]
    single = ours("one text", return_tensors="pt")
    assert single["input_ids"].shape[0] == 1
    assert isinstance(ours("one text", return_tensors=None)["input_ids"][0], int)
    assert out.word_ids(0)[0] is None and out.sequence_ids(0)[1] == 0


def test_split_into_words(bert):
    ours, theirs = bert
    words = [["Hello", "world"], ["東京", "に", "行く"]]
    _same(ours, theirs, words, is_split_into_words=True, padding=True, return_tensors="pt")


def test_decode_and_batch_decode(bert, gpt2):
    for ours, theirs in (bert, gpt2):
        ids = theirs(TEXTS)["input_ids"]
        assert ours.batch_decode(ids) == theirs.batch_decode(ids)
        assert ours.batch_decode(ids, skip_special_tokens=True) == theirs.batch_decode(ids, skip_special_tokens=True)
        assert ours.decode(torch.tensor(ids[0])) == theirs.decode(ids[0])


def test_vocabulary_properties(bert, gpt2):
    for ours, theirs in (bert, gpt2):
        assert ours.vocab_size == theirs.vocab_size and len(ours) == len(theirs)
        for name in ("pad", "mask", "cls", "sep", "bos", "eos", "unk"):
            assert getattr(ours, f"{name}_token_id") == getattr(theirs, f"{name}_token_id"), name
        tokens = theirs.tokenize("Hello unbelievable world")
        assert ours.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens)
        ids = theirs.convert_tokens_to_ids(tokens)
        assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
        assert ours.tokenize("Hello unbelievable world") == tokens


def test_add_special_tokens(gpt2_hf_dir):
    ours = Tokenizer.from_pretrained(gpt2_hf_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(gpt2_hf_dir)
    assert ours.pad_token_id is None
    spec = {"pad_token": "<pad>", "additional_special_tokens": ["<sep>"]}
    assert ours.add_special_tokens(spec) == theirs.add_special_tokens(spec) == 2
    assert ours.pad_token_id == theirs.pad_token_id == 50257
    text = "a <sep> b"
    assert ours.encode(text) == theirs(text)["input_ids"]
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == theirs.decode(
        theirs(text)["input_ids"], skip_special_tokens=True
    )
    ours.pad_token = ours.eos_token
    assert ours.pad_token_id == 50256


def _assert_round_trip(tokenizer: Tokenizer, folder, texts) -> None:
    written = tokenizer.save_pretrained(folder)
    assert {path.name for path in written} >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"
    reloaded = Tokenizer.from_pretrained(folder)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    expected = tokenizer(texts, return_tensors=None)["input_ids"]
    assert reloaded(texts, return_tensors=None)["input_ids"] == expected
    assert hf(texts)["input_ids"] == expected
    assert hf.model_input_names == tokenizer.model_input_names


def test_save_pretrained_round_trips(minilm_dir, gpt2_original, roberta_dir, tmp_path, fixture_strings):
    texts = [s for s in fixture_strings if len(s) < 1000]
    for name, source in (("bert", minilm_dir), ("gpt2", gpt2_original), ("roberta", roberta_dir)):
        tokenizer = Tokenizer.from_pretrained(source)
        tokenizer(texts[:3], truncation=True, max_length=4, return_tensors=None)  # must not leak into the file
        _assert_round_trip(tokenizer, tmp_path / name, texts)
        saved = json.loads((tmp_path / name / "tokenizer.json").read_text(encoding="utf-8"))
        assert saved["padding"] is None and saved["truncation"] is None
    assert (tmp_path / "bert" / "vocab.txt").read_text(encoding="utf-8").split("\n")[:2] == ["[PAD]", "[unused0]"]


def test_save_pretrained_gguf(smollm_gguf, tmp_path, fixture_strings):
    tokenizer = Tokenizer.from_gguf(smollm_gguf)
    _assert_round_trip(tokenizer, tmp_path / "smollm", [s for s in fixture_strings if len(s) < 1000])
    assert Tokenizer.from_pretrained(tmp_path / "smollm").chat_template == tokenizer.chat_template


def test_japanese_save_reload(japanese_dir, tmp_path):
    tokenizer = Tokenizer.from_pretrained(japanese_dir)
    tokenizer.save_pretrained(tmp_path)
    reloaded = Tokenizer.from_pretrained(tmp_path)
    text = "吾輩は猫である。ｶﾞｷﾞ"
    assert reloaded(text, return_tensors=None)["input_ids"] == tokenizer(text, return_tensors=None)["input_ids"]
    assert transformers.BertJapaneseTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == reloaded.encode(text)


def test_japanese_tokenizer_loads_and_saves_without_mecab(japanese_dir, tmp_path, monkeypatch):
    """MeCab starts on the first text to segment: without fugashi (a GPU machine pretraining on an already
    tokenized corpus) the tokenizer loads, knows its special tokens and saves an equal folder; segmenting text
    then says what to install."""
    expected = Tokenizer.from_pretrained(japanese_dir)
    monkeypatch.setitem(sys.modules, "fugashi", None)  # import fugashi now fails
    tokenizer = Tokenizer.from_pretrained(japanese_dir)
    assert len(tokenizer) == len(expected) and tokenizer.mask_token_id == expected.mask_token_id
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModuleNotFoundError, match="pip install 'bunmyaku\\[ja\\]'"):
        tokenizer("吾輩は猫である。")
    monkeypatch.delitem(sys.modules, "fugashi")
    text = "吾輩は猫である。ｶﾞｷﾞ"
    assert Tokenizer.from_pretrained(tmp_path).encode(text) == expected.encode(text)


def test_bert_vocab_txt_folder(minilm_dir, tmp_path, fixture_strings):
    """A folder with only vocab.txt + tokenizer_config.json builds BERT's pipeline from the config."""
    (tmp_path / "vocab.txt").write_bytes((minilm_dir / "vocab.txt").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer"})
    )
    ours = Tokenizer.from_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    texts = [s for s in fixture_strings if len(s) < 1000]
    assert ours(texts, return_tensors=None)["input_ids"] == theirs(texts)["input_ids"]


def test_sentencepiece_models_match_sentencepiece(data, tmp_path):
    spm = require_module("sentencepiece")
    lines = [line for line in (data / "botchan-en" / "botchan.txt").read_text(encoding="utf-8").splitlines() if line]
    for model_type in ("unigram", "bpe"):
        prefix = tmp_path / model_type
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines[:3000]),
            model_prefix=str(prefix),
            vocab_size=600,
            model_type=model_type,
            minloglevel=2,
        )
        reference = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
        ours = Tokenizer.from_pretrained(f"{prefix}.model")
        sample = lines[3000:3300] + ["  double  spaces  ", "Ünïcödé", "ﾊﾝｶｸ"]
        got = ours(sample, return_tensors=None)["input_ids"]
        for text, ids in zip(sample, got, strict=True):
            assert ids == reference.encode(text), (model_type, text)
            if reference.unk_id() not in ids:  # SentencePiece renders <unk> as " ⁇ "
                assert ours.decode(ids) == reference.decode(ids), (model_type, text)


def test_word_ids_without_offsets_match_transformers(minilm_dir):
    """The fast path (no offsets asked) still answers word_ids(), by re-encoding once on demand."""
    ours = Tokenizer.from_pretrained(minilm_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    texts, pairs = ["hello worldly things, unbelievably", "x"], ["second one", "a pair"]
    got = ours(texts, pairs, padding=True)
    expected = theirs(texts, pairs, padding=True)
    for i in range(len(texts)):
        assert got.word_ids(i) == expected.word_ids(i)


@pytest.mark.parametrize("texts", [TEXTS[0], TEXTS[:2]], ids=["one", "batch"])
def test_lists_by_default_and_tensors_on_request_as_transformers(bert, texts):
    """No return_tensors: the same Python lists (and offset tuples) as transformers; "pt" / "np": same tensors."""
    import numpy as np

    ours, theirs = bert
    kwargs = {"return_offsets_mapping": True, "return_special_tokens_mask": True}
    mine, reference = ours(texts, **kwargs), theirs(texts, **kwargs)
    assert set(mine) == set(reference)
    for key, value in reference.items():
        assert type(mine[key]) is list and mine[key] == value, key
    assert mine.input_ids == reference.input_ids and mine.attention_mask == reference.attention_mask
    pairs = PAIRS[0] if isinstance(texts, str) else PAIRS[:2]
    assert ours(texts, pairs).input_ids == theirs(texts, pairs).input_ids
    for kind, array_type in (("pt", torch.Tensor), ("np", np.ndarray)):
        mine = ours(texts, padding=True, return_tensors=kind, **kwargs)
        reference = theirs(texts, padding=True, return_tensors=kind, **kwargs)
        assert set(mine) == set(reference)
        for key, value in reference.items():
            assert isinstance(mine[key], array_type) and mine[key].dtype == value.dtype, key
            assert mine[key].shape == value.shape and (mine[key] == value).all(), key
    with pytest.raises(AttributeError, match="no attribute or key 'labels'"):
        getattr(ours(texts), "labels")  # noqa: B009 (the attribute access is the point)
    with pytest.raises(ValueError, match="return_tensors must be 'pt', 'np' or None"):
        ours(texts, return_tensors="tf")
