"""DeBERTa-v2 / v3 tokenizers: ids, segment ids, offsets and decoding identical to transformers' DebertaV2Tokenizer.

The spm.model fixture is trained here with SentencePiece itself, laid out as microsoft/deberta-v3-* ship theirs
([PAD] [CLS] [SEP] [UNK] at ids 0-3); the folders mimic the hub layouts: spm.model with tokenizer_config.json
(with or without `tokenizer_class`, then config.json's `model_type`), and the tokenizer.json folder that
transformers' own save_pretrained writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bunmyaku.cli import app
from bunmyaku.tokenization import Tokenizer, train_tokenizer
from tests.conftest import require_module
from tests.tokenization.test_parity import _assert_same_encodings

transformers = require_module("transformers", reason="DeBERTa tokenizers are compared with transformers")
sentencepiece = require_module("sentencepiece", reason="the spm.model fixture needs the 'spm' extra")

RESERVED = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3}
SPM_VOCAB = 1000
# The options DebertaV2Tokenizer reads from tokenizer_config.json, all away from their defaults.
OPTIONS = {"tokenizer_class": "DebertaV2Tokenizer", "do_lower_case": True, "split_by_punct": True}
SPECIAL_TOKENS_MAP = {
    "bos_token": "[CLS]",
    "eos_token": "[SEP]",
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
FAMILIES = ["v3-spm", "options-spm", "v3-tokenizer-json", "options-tokenizer-json", "v4-tokenizer-json"]


def _lines(path: Path, count: int) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:count]


@pytest.fixture(scope="session")
def spm_model(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1000-piece Unigram spm.model on English and Japanese lines, with DeBERTa-v3's reserved ids."""
    texts = _lines(data / "botchan-en" / "botchan.txt", 400) + _lines(data / "aozora" / "lemon.txt", 150)
    prefix = tmp_path_factory.mktemp("deberta_spm") / "spm"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(prefix),
        model_type="unigram",
        vocab_size=SPM_VOCAB,
        character_coverage=0.9995,
        pad_id=0,
        pad_piece="[PAD]",
        bos_id=1,
        bos_piece="[CLS]",
        eos_id=2,
        eos_piece="[SEP]",
        unk_id=3,
        unk_piece="[UNK]",
        num_threads=1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="session")
def corpus(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """English and Japanese lines to train on, small enough to train in a second."""
    texts = _lines(data / "botchan-en" / "botchan.txt", 800) + _lines(data / "aozora" / "lemon.txt", 300)
    path = tmp_path_factory.mktemp("deberta_corpus") / "mixed.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


def _folder(root: Path, spm_model: Path, files: dict[str, dict]) -> Path:
    root.mkdir()
    (root / "spm.model").write_bytes(spm_model.read_bytes())
    for name, content in files.items():
        (root / name).write_text(json.dumps(content), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def folders(spm_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deberta_folders")
    # microsoft/deberta-v3-base: no tokenizer_class, so transformers goes by config.json's model_type.
    v3 = _folder(
        root / "v3",
        spm_model,
        {
            "tokenizer_config.json": {"do_lower_case": False, "vocab_type": "spm"},
            "config.json": {"model_type": "deberta-v2"},
        },
    )
    options = _folder(
        root / "options",
        spm_model,
        {"tokenizer_config.json": OPTIONS, "special_tokens_map.json": SPECIAL_TOKENS_MAP},
    )
    found = {"v3-spm": v3, "options-spm": options}
    for name, source in (("v3", v3), ("options", options)):
        saved = root / f"{name}-tokenizer-json"
        transformers.AutoTokenizer.from_pretrained(source).save_pretrained(saved)
        assert (saved / "tokenizer.json").is_file() and not (saved / "spm.model").exists()
        found[f"{name}-tokenizer-json"] = saved
    found["v4-tokenizer-json"] = _as_saved_by_transformers_4(found["v3-tokenizer-json"], root / "v4", spm_model)
    return found


def _as_saved_by_transformers_4(saved: Path, folder: Path, spm_model: Path) -> Path:
    """The folder with the normaliser transformers 4 wrote into tokenizer.json (SentencePiece's NFKC map).

    transformers 5 rebuilds DeBERTa's pipeline from tokenizer_config.json and ignores this one; so must we.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, normalizers
    from tokenizers import Tokenizer as Backend

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_model.read_bytes())
    backend = Backend.from_file(str(saved / "tokenizer.json"))
    backend.normalizer = normalizers.Sequence(
        [
            normalizers.Strip(),
            normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    folder.mkdir()
    (folder / "tokenizer.json").write_text(backend.to_str(), encoding="utf-8")
    (folder / "tokenizer_config.json").write_bytes((saved / "tokenizer_config.json").read_bytes())
    return folder


@pytest.fixture(scope="module")
def families(folders: dict[str, Path]) -> dict[str, tuple[Tokenizer, object]]:
    """(bunmyaku tokenizer, transformers tokenizer) for each layout."""
    pairs = {}
    for name, folder in folders.items():
        theirs = transformers.AutoTokenizer.from_pretrained(folder)
        assert type(theirs).__name__ == "DebertaV2Tokenizer", (name, type(theirs))
        pairs[name] = (Tokenizer.from_pretrained(folder), theirs)
    return pairs


@pytest.mark.parametrize("family", FAMILIES)
def test_single_texts_match_transformers(families, family, fixture_strings):
    ours, theirs = families[family]
    _assert_same_encodings(ours, theirs, fixture_strings)


@pytest.mark.parametrize("family", FAMILIES)
def test_pairs_match_transformers(families, family, fixture_pairs):
    ours, theirs = families[family]
    first, second = (list(side) for side in zip(*fixture_pairs, strict=True))
    _assert_same_encodings(ours, theirs, first, second)


def test_options_change_the_tokens(families):
    """Lower-casing and punctuation splitting are read from the folder (else the options test proves nothing)."""
    text = "Hello,World"
    plain, options = families["v3-spm"][0], families["options-spm"][0]
    assert plain.tokenize(text) != options.tokenize(text)
    assert "," in options.tokenize(text) and all(t == t.lower() for t in options.tokenize(text))


def test_reserved_ids_and_segments(families):
    ours, theirs = families["v3-spm"]
    for token, index in RESERVED.items():
        assert ours.convert_tokens_to_ids(token) == index
    # [MASK] is not a piece of spm.model: it comes right after the last one.
    assert ours.mask_token_id == SPM_VOCAB == theirs.mask_token_id and len(ours) == SPM_VOCAB + 1
    assert (ours.pad_token_id, ours.cls_token_id, ours.sep_token_id, ours.unk_token_id) == (0, 1, 2, 3)
    first, second = "Hello world.", "檸檬を一つ買った。"
    n_first, n_second = len(ours.tokenize(first)), len(ours.tokenize(second))
    encoded = ours(first, second)
    assert encoded["input_ids"][0] == 1 and encoded["input_ids"][n_first + 1] == 2 and encoded["input_ids"][-1] == 2
    assert encoded["token_type_ids"] == [0] * (n_first + 2) + [1] * (n_second + 1)


def test_unknown_piece_is_found_by_name(folders, tmp_path):
    """A tokenizer.json whose Unigram names another unknown id still maps unknown text to [UNK], as transformers."""
    saved = folders["v3-tokenizer-json"]
    (tmp_path / "tokenizer_config.json").write_bytes((saved / "tokenizer_config.json").read_bytes())
    data = json.loads((saved / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["unk_id"] = 0
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    text = ["☃ snowman ☃", "ⅷ ꙮ"]
    ids = Tokenizer.from_pretrained(tmp_path)(text)["input_ids"]
    assert ids == transformers.AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"]
    assert all(RESERVED["[UNK]"] in row and RESERVED["[PAD]"] not in row for row in ids)


@pytest.mark.parametrize("family", ["v3-spm", "options-tokenizer-json"])
@pytest.mark.parametrize(
    "settings",
    [
        {"max_length": 9, "truncation": True},
        {"max_length": 16, "truncation": "only_second"},
        {"max_length": 10, "truncation": "longest_first", "padding": "max_length"},
        {"padding": True},
        {"max_length": 20, "truncation": True, "stride": 3, "return_overflowing_tokens": True},
    ],
)
def test_truncation_and_padding_match_transformers(families, family, settings, fixture_pairs):
    ours, theirs = families[family]
    first, second = ([text[:60] for text in side] for side in zip(*fixture_pairs[:40], strict=True))
    if settings.get("truncation") == "only_second":
        first = [text[:4] for text in first]  # only_second needs a first text that leaves room for the second
    kwargs = {**settings, "return_offsets_mapping": True, "return_token_type_ids": True}
    mine, reference = ours(first, second, **kwargs), theirs(first, second, **kwargs)
    keys = ["input_ids", "token_type_ids", "attention_mask", "offset_mapping"]
    if settings.get("return_overflowing_tokens"):
        keys.append("overflow_to_sample_mapping")
        assert len(mine["input_ids"]) > len(first)  # windows were cut, so the stride path ran
    for key in keys:
        assert [list(map(tuple, r)) if key == "offset_mapping" else r for r in mine[key]] == [
            list(map(tuple, r)) if key == "offset_mapping" else r for r in reference[key]
        ], key


@pytest.mark.parametrize("family", ["v3-spm", "options-spm"])
def test_saved_folder_loads_in_transformers(families, family, tmp_path, fixture_strings, fixture_pairs):
    ours, theirs = families[family]
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "DebertaV2Tokenizer"
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "DebertaV2Tokenizer" and reloaded.mask_token_id == SPM_VOCAB
    first, second = (list(side) for side in zip(*fixture_pairs, strict=True))
    _assert_same_encodings(ours, reloaded, fixture_strings)
    _assert_same_encodings(ours, reloaded, first, second)
    # ... and it is the same tokenizer as the one the original folder gives transformers.
    assert reloaded(fixture_strings)["input_ids"] == theirs(fixture_strings)["input_ids"]
    again = Tokenizer.from_pretrained(tmp_path)
    _assert_same_encodings(again, theirs, fixture_strings)


def _check_trained_deberta_folder(folder: Path, fixture_strings, fixture_pairs, lowercase: bool) -> None:
    ours = Tokenizer.from_pretrained(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert type(theirs).__name__ == "DebertaV2Tokenizer"
    vocab = theirs.get_vocab()
    assert {token: vocab[token] for token in RESERVED} == RESERVED
    assert theirs.mask_token_id == len(theirs) - 1 == ours.mask_token_id
    sample = [s for s in fixture_strings if len(s) < 1000]
    _assert_same_encodings(ours, theirs, sample)
    first, second = (list(side) for side in zip(*fixture_pairs, strict=True))
    _assert_same_encodings(ours, theirs, first, second)
    text = "檸檬を一つ買った。 The boy went to school."
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == (text.lower() if lowercase else text)


def test_train_deberta_style_loads_in_transformers(corpus, tmp_path, fixture_strings, fixture_pairs):
    tokenizer = train_tokenizer([corpus], "unigram", 1500, style="deberta", output_dir=tmp_path)
    assert 1200 <= len(tokenizer) <= 1500 and tokenizer.mask_token_id == len(tokenizer) - 1
    _check_trained_deberta_folder(tmp_path, fixture_strings, fixture_pairs, lowercase=False)


def test_train_tokenizer_cli_deberta_style(corpus, tmp_path, fixture_strings, fixture_pairs):
    folder = tmp_path / "tok"
    args = ["train-tokenizer", corpus.name, "--kind", "unigram", "--style", "deberta", "--vocab-size", "1000"]
    args += ["--lowercase", "--output-dir", str(folder), "--data-dir", str(corpus.parent)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))["do_lower_case"] is True
    _check_trained_deberta_folder(folder, fixture_strings, fixture_pairs, lowercase=True)


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


def _damaged(data: bytes) -> dict[str, bytes]:
    piece = data.find("▁the".encode())
    not_utf8 = data[: piece + 3] + b"\xff" + data[piece + 4 :]  # the wire format survives, one piece does not
    return {"truncated": data[: len(data) // 2], "not-utf8-piece": not_utf8, "text": b"not a model\n", "empty": b""}


@pytest.mark.parametrize("damage", ["truncated", "not-utf8-piece", "text", "empty"])
def test_damaged_spm_model_names_the_file(spm_model, tmp_path, damage):
    folder = _folder(tmp_path / "damaged", spm_model, {"tokenizer_config.json": OPTIONS})
    (folder / "spm.model").write_bytes(_damaged(spm_model.read_bytes())[damage])
    with pytest.raises(ValueError, match=r"damaged[/\\]spm\.model (is not a SentencePiece model|is damaged)"):
        Tokenizer.from_pretrained(folder)


def test_bpe_sentencepiece_is_not_a_deberta_vocabulary(data, tmp_path):
    prefix = tmp_path / "bpe"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_lines(data / "botchan-en" / "botchan.txt", 300)),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=300,
        num_threads=1,
        minloglevel=2,
    )
    folder = _folder(tmp_path / "folder", prefix.with_suffix(".model"), {"tokenizer_config.json": OPTIONS})
    with pytest.raises(ValueError, match=r"folder[/\\]spm\.model: a DeBERTa-v2 tokenizer is a SentencePiece Unigram"):
        Tokenizer.from_pretrained(folder)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "wordpiece"}, "pass kind='unigram'"),
        ({"kind": "unigram", "pre_tokenizer": "whitespace"}, "pre_tokenizer='metaspace'"),
        ({"kind": "unigram", "special_tokens": ["<s>", "</s>"]}, "leave special_tokens unset"),
        ({"kind": "unigram", "vocab_size": 5}, "vocab_size above its 5 special tokens"),
        ({"kind": "unigram", "style": "roberta"}, "style must be 'deberta'"),
    ],
)
def test_deberta_style_rejects_options_it_cannot_honour(corpus, options, message):
    settings = {"style": "deberta", "vocab_size": 500, **options}
    with pytest.raises(ValueError, match=message):
        train_tokenizer([corpus], **settings)
