"""Training new vocabularies with the `tokenizers` trainers: WordPiece, BPE, byte-level BPE, Unigram, characters.

`train_tokenizer(files, kind=..., pre_tokenizer="mecab")` reproduces the cl-tohoku Japanese BERT recipe
(NFKC, MeCab words, WordPiece); `kind="byte-bpe"` is GPT-2's recipe; `kind="unigram", style="deberta"` is
DeBERTa-v2 / v3's (its special ids, text pipeline and template, a folder `DebertaV2Tokenizer` loads).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from bunmyaku.tokenization import formats
from bunmyaku.tokenization.japanese import DEFAULT_MECAB_DIC, mecab_pre_tokenizer
from bunmyaku.tokenization.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Kind = Literal["wordpiece", "bpe", "byte-bpe", "unigram", "character"]
PreTokenizerName = Literal["mecab", "bert", "whitespace", "metaspace", "byte-level"]
Style = Literal["deberta"]

_DEFAULT_PRE_TOKENIZER = {
    "wordpiece": "bert",
    "bpe": "metaspace",
    "byte-bpe": "byte-level",
    "unigram": "metaspace",
    "character": "mecab",
}
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_GPT_SPECIALS = ["<|endoftext|>", "<pad>"]
# Which role a conventional special token plays; anything else becomes an additional special token.
_ROLES = {
    "[PAD]": ("pad_token",),
    "<pad>": ("pad_token",),
    "[UNK]": ("unk_token",),
    "<unk>": ("unk_token",),
    "[CLS]": ("cls_token",),
    "[SEP]": ("sep_token",),
    "[MASK]": ("mask_token",),
    "<mask>": ("mask_token",),
    "<s>": ("bos_token", "cls_token"),
    "</s>": ("eos_token", "sep_token"),
    "<|endoftext|>": ("bos_token", "eos_token", "unk_token"),
}
_TRAIN_BATCH = 1000


def train_tokenizer(
    files: Sequence[str | os.PathLike | dict[str, Any]],
    kind: Kind = "wordpiece",
    vocab_size: int = 32000,
    *,
    pre_tokenizer: PreTokenizerName | None = None,
    special_tokens: Sequence[str] | None = None,
    output_dir: str | os.PathLike | None = None,
    min_frequency: int = 2,
    lowercase: bool = False,
    limit_alphabet: int | None = None,
    model_max_length: int | None = 512,
    style: Style | None = None,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a vocabulary on text files and return (and optionally save) the tokenizer.

    Args:
        files: plain-text files (one line, one text), or dicts `{"path": ..., "fields": [...]}` that take
            string fields from .jsonl lines, a .json list of records, SQuAD-layout .json (`"context"`,
            `"question"`) or .tsv columns (`fields: [0]`).
        kind: "wordpiece" (BERT), "bpe", "byte-bpe" (GPT-2), "unigram" (SentencePiece's model) or
            "character" (one token per character, cl-tohoku's character BERT).
        vocab_size: size of the vocabulary, special tokens included.
        pre_tokenizer: how text is cut into words before subwords are learned; "mecab" for Japanese.
            Defaults: wordpiece "bert", bpe / unigram "metaspace", byte-bpe "byte-level", character "mecab".
        special_tokens: reserved tokens, given ids 0, 1, ... in order; defaults to BERT's five for
            wordpiece / character / unigram and `<|endoftext|>`, `<pad>` for the BPEs.
        output_dir: when given, the trained folder is saved there (see `Tokenizer.save_pretrained`).
        min_frequency: a merge or word must occur this often to enter the vocabulary.
        lowercase: lower-case the text (after MeCab for Japanese, as cl-tohoku does).
        limit_alphabet: keep at most this many distinct characters as initial tokens (WordPiece / BPE).
        model_max_length: the length limit saved with the tokenizer.
        style: "deberta" lays the folder out as DeBERTa-v2 / v3's tokenizer (with kind="unigram"): `[PAD]`
            `[CLS]` `[SEP]` `[UNK]` at ids 0-3, `[MASK]` after the last piece, DeBERTa's normaliser and
            `▁`-word pre-tokenizer (training sees the text exactly as `DebertaV2Tokenizer` will), the
            `[CLS] A [SEP] B [SEP]` template with segment ids, and `tokenizer_class: DebertaV2Tokenizer`.
        show_progress: draw the trainer's progress bars (for the CLI).

    Returns:
        The trained `Tokenizer`.

    Raises:
        FileNotFoundError: when a training file is missing.
        ValueError: when a file is not UTF-8 (naming the file and byte offset), an option is unknown, or
            there is no text to train on.
    """
    if kind not in _DEFAULT_PRE_TOKENIZER:
        raise ValueError(f"kind must be one of {sorted(_DEFAULT_PRE_TOKENIZER)}, got {kind!r}")
    pre_name = pre_tokenizer or _DEFAULT_PRE_TOKENIZER[kind]
    if kind == "byte-bpe" and pre_name != "byte-level":
        raise ValueError(f"kind='byte-bpe' works on bytes and takes pre_tokenizer='byte-level', got {pre_name!r}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    asked = vocab_size
    if style == "deberta":
        _check_deberta_options(kind, pre_name, special_tokens, vocab_size)
        special_tokens = formats.DEBERTA_V2_RESERVED
        # [MASK] comes after the learned pieces, so the trainer leaves it one slot.
        vocab_size -= 1
    elif style is not None:
        raise ValueError(f"style must be 'deberta' or None, got {style!r}")
    if special_tokens is None:
        special_tokens = _GPT_SPECIALS if kind in ("bpe", "byte-bpe") else _BERT_SPECIALS
    special_tokens = list(dict.fromkeys(special_tokens))
    roles = _assign_roles(special_tokens)
    texts = [text for source in files for text in read_texts(source)]
    if not texts:
        raise ValueError(f"No text to train on in {list(files)}")
    logger.info("Training a %s tokenizer (vocab %d, %s words) on %d texts", kind, vocab_size, pre_name, len(texts))

    backend, trainer = _model_and_trainer(
        kind, vocab_size, min_frequency, special_tokens, roles, limit_alphabet, show_progress
    )
    if style == "deberta":
        deberta = {**formats.DEBERTA_V2_SPECIALS, "do_lower_case": lowercase, "model_max_length": model_max_length}
        formats.set_deberta_v2_pipeline(backend, deberta)
    else:
        backend.normalizer = _normalizer(pre_name, lowercase)
        backend.pre_tokenizer = _pre_tokenizer(pre_name, lowercase, kind)
        backend.decoder = _decoder(kind, pre_name)
    batches = (texts[i : i + _TRAIN_BATCH] for i in range(0, len(texts), _TRAIN_BATCH))
    backend.train_from_iterator(batches, trainer=trainer, length=(len(texts) + _TRAIN_BATCH - 1) // _TRAIN_BATCH)
    trained = backend.get_vocab_size() + (style == "deberta")  # DeBERTa's [MASK] is added after training
    if trained < 0.9 * asked:  # trainers often stop a few tokens short; a vocabulary this short says the text is
        logger.warning(
            "The %s tokenizer has %d tokens, fewer than the vocab_size %d asked: %d texts hold too few distinct "
            "words and pieces (seen at least min_frequency=%d times) to fill it. Train on more text, or ask for a "
            "smaller vocabulary.",
            kind,
            trained,
            asked,
            len(texts),
            min_frequency,
        )
    if style == "deberta":
        tokenizer = Tokenizer(*formats.build_deberta_v2(backend, deberta, None))
        if output_dir is not None:
            tokenizer.save_pretrained(output_dir)
        return tokenizer

    vocab = backend.get_vocab()
    if "cls_token" in roles and "sep_token" in roles:
        backend.post_processor = formats.bert_template(roles["cls_token"], roles["sep_token"], vocab)
        input_names = formats.BERT_INPUT_NAMES
    else:
        backend.post_processor = formats.sequence_template(None, None, vocab)
        input_names = formats.CAUSAL_INPUT_NAMES
    config: dict[str, Any] = {**roles, "model_max_length": model_max_length, "model_input_names": input_names}
    extra = [t for t in special_tokens if t not in roles.values()]
    if extra:
        config["additional_special_tokens"] = extra
    if pre_name == "mecab" and kind in ("wordpiece", "character"):
        # The cl-tohoku layout, so transformers' BertJapaneseTokenizer reads vocab.txt + tokenizer_config.json.
        config.update(
            tokenizer_class="BertJapaneseTokenizer",
            do_lower_case=lowercase,
            word_tokenizer_type="mecab",
            subword_tokenizer_type="character" if kind == "character" else "wordpiece",
            mecab_kwargs={"mecab_dic": DEFAULT_MECAB_DIC},
        )
    elif pre_name == "mecab":
        logger.warning("A MeCab %s tokenizer loads in bunmyaku; transformers has no class that runs it", kind)
        config.update(word_tokenizer_type="mecab", subword_tokenizer_type=kind, do_lower_case=lowercase)
    tokenizer = Tokenizer(backend, config)
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
    return tokenizer


def _check_deberta_options(kind: str, pre_name: str, special_tokens: Sequence[str] | None, vocab_size: int) -> None:
    """DeBERTa-v2's tokenizer is a Unigram over `▁`-prefixed words with fixed special tokens; say so early."""
    if vocab_size <= len(formats.DEBERTA_V2_RESERVED) + 1:
        raise ValueError(f"style='deberta' needs vocab_size above its 5 special tokens, got {vocab_size}")
    if kind != "unigram":
        raise ValueError(f"style='deberta' trains a SentencePiece-style Unigram: pass kind='unigram', got {kind!r}")
    if pre_name != "metaspace":
        raise ValueError(
            f"style='deberta' splits words at spaces as DebertaV2Tokenizer does (pre_tokenizer='metaspace'), "
            f"got {pre_name!r}"
        )
    if special_tokens is not None and list(special_tokens) != formats.DEBERTA_V2_RESERVED + ["[MASK]"]:
        raise ValueError(
            f"style='deberta' reserves [PAD] [CLS] [SEP] [UNK] (ids 0-3) and [MASK] (last); leave special_tokens "
            f"unset, got {list(special_tokens)}"
        )


def _assign_roles(special_tokens: Sequence[str]) -> dict[str, str]:
    roles: dict[str, str] = {}
    for token in special_tokens:
        for role in _ROLES.get(token, ()):
            roles.setdefault(role, token)
    return roles


def _model_and_trainer(
    kind: str,
    vocab_size: int,
    min_frequency: int,
    special_tokens: list[str],
    roles: dict[str, str],
    limit_alphabet: int | None,
    show_progress: bool,
) -> tuple[Backend, trainers.Trainer]:
    unk = roles.get("unk_token")
    common = {"vocab_size": vocab_size, "special_tokens": special_tokens, "show_progress": show_progress}
    alphabet = {} if limit_alphabet is None else {"limit_alphabet": limit_alphabet}
    if kind == "wordpiece":
        model = models.WordPiece(vocab={}, unk_token=unk or "[UNK]", max_input_chars_per_word=100)
        trainer = trainers.WordPieceTrainer(
            min_frequency=min_frequency, continuing_subword_prefix="##", **alphabet, **common
        )
    elif kind == "character":
        model = models.WordLevel(vocab={}, unk_token=unk or "[UNK]")
        trainer = trainers.WordLevelTrainer(min_frequency=min_frequency, **common)
    elif kind == "bpe":
        model = models.BPE(unk_token=unk, fuse_unk=True)
        trainer = trainers.BpeTrainer(min_frequency=min_frequency, **alphabet, **common)
    elif kind == "byte-bpe":
        model = models.BPE()
        trainer = trainers.BpeTrainer(
            min_frequency=min_frequency, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **common
        )
    else:
        model = models.Unigram()
        trainer = trainers.UnigramTrainer(unk_token=unk, **common)
    return Backend(model), trainer


def _normalizer(pre_name: str, lowercase: bool) -> normalizers.Normalizer | None:
    if pre_name == "bert":
        return normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
        )
    if pre_name == "byte-level":
        return normalizers.Lowercase() if lowercase else None
    steps = [normalizers.NFKC()]
    # MeCab lower-cases after segmentation (cl-tohoku); elsewhere lower-casing is a normaliser step.
    if lowercase and pre_name != "mecab":
        steps.append(normalizers.Lowercase())
    return normalizers.Sequence(steps) if len(steps) > 1 else steps[0]


def _pre_tokenizer(pre_name: str, lowercase: bool, kind: str) -> pre_tokenizers.PreTokenizer:
    split_characters = kind == "character"
    if pre_name == "mecab":
        return mecab_pre_tokenizer(DEFAULT_MECAB_DIC, do_lower_case=lowercase, split_characters=split_characters)
    table = {
        "bert": pre_tokenizers.BertPreTokenizer,
        "whitespace": pre_tokenizers.WhitespaceSplit,
        "metaspace": pre_tokenizers.Metaspace,
        "byte-level": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    }
    if pre_name not in table:
        raise ValueError(f"pre_tokenizer must be one of {sorted([*table, 'mecab'])}, got {pre_name!r}")
    words = table[pre_name]()
    if split_characters:
        return pre_tokenizers.Sequence([words, pre_tokenizers.Split(Regex("."), behavior="isolated")])
    return words


def _decoder(kind: str, pre_name: str) -> decoders.Decoder:
    if kind == "byte-bpe":
        return decoders.ByteLevel()
    if pre_name == "metaspace":
        return decoders.Metaspace()
    if kind == "unigram":
        return decoders.Fuse()
    # Words joined by spaces, `##` pieces glued on: how BERT (and cl-tohoku) decode.
    return decoders.WordPiece(prefix="##", cleanup=pre_name != "mecab")


# ---------------------------------------------------------------------------------------------------
# Reading training text
# ---------------------------------------------------------------------------------------------------


def read_texts(source: str | os.PathLike | dict[str, Any]) -> list[str]:
    """The training texts of one source: a path, or `{"path": ..., "fields": [...]}` for structured files.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when it is not UTF-8 (naming the byte offset) or its fields cannot be read.
    """
    if isinstance(source, dict):
        path, fields = Path(source["path"]), list(source.get("fields") or [])
    else:
        path, fields = Path(source), []
    text = read_utf8(path)
    if not fields:
        return [line for line in text.splitlines() if line.strip()]
    suffix = path.suffix.lower()
    # Records end at "\n" only: str.splitlines would also cut at U+2028, U+0085 and others inside a text.
    rows = [row.removesuffix("\r") for row in text.split("\n")]
    if suffix == ".jsonl":
        records = [_parse_json(path, line, number) for number, line in enumerate(rows, 1) if line.strip()]
    elif suffix == ".json":
        records = list(_json_records(_parse_json(path, text, 1)))
    elif suffix == ".tsv":
        return [row.split("\t")[int(f)] for row in rows if row.strip() for f in fields]
    else:
        raise ValueError(f"{path}: fields {fields} can only be read from .jsonl, .json or .tsv files")
    texts = [record[f] for record in records for f in fields if isinstance(record.get(f), str)]
    if not texts:
        raise ValueError(f"{path}: no string field among {fields} in any record")
    return [t for t in texts if t.strip()]


def read_utf8(path: Path) -> str:
    """The file's text, checked to be UTF-8.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: naming the file and the byte offset of the first invalid byte.
    """
    if not path.is_file():
        raise FileNotFoundError(f"Training file {path} does not exist")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not valid UTF-8: byte offset {error.start} ({data[error.start : error.start + 4]!r}); "
            "re-encode it, e.g. iconv -f SHIFT_JIS -t UTF-8"
        ) from error


def _parse_json(path: Path, text: str, line: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{line}: invalid JSON: {error}") from error


def _json_records(data: Any) -> Iterator[dict[str, Any]]:
    """Records of a JSON list, or every paragraph and question of a SQuAD-layout file."""
    if isinstance(data, list):
        yield from (record for record in data if isinstance(record, dict))
    elif isinstance(data, dict) and isinstance(data.get("data"), list):
        for article in data["data"]:
            for paragraph in article.get("paragraphs", []):
                yield paragraph
                yield from paragraph.get("qas", [])
