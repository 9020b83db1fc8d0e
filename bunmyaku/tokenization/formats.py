"""Builders that turn each vocabulary format into a `tokenizers.Tokenizer` plus a settings dict.

Every builder returns `(backend, config)`: the Rust tokenizer and a dict in the shape of
tokenizer_config.json (special tokens, `tokenizer_class`, `model_input_names`, ...), which
`bunmyaku.tokenization.Tokenizer` turns into its attributes and writes back on save.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from bunmyaku.tokenization.japanese import mecab_pre_tokenizer, mecab_settings

logger = logging.getLogger(__name__)

BERT_INPUT_NAMES = ["input_ids", "token_type_ids", "attention_mask"]
CAUSAL_INPUT_NAMES = ["input_ids", "attention_mask"]

_GPT2_SPECIALS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
_ROBERTA_SPECIALS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "sep_token": "</s>",
    "cls_token": "<s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
}
_BERT_SPECIALS = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
# DeBERTa-v2 / v3 (microsoft/deberta-v3-*): the spm.model holds [PAD] [CLS] [SEP] [UNK] as ids 0-3 and
# [MASK] is added after the last piece.
DEBERTA_V2_SPECIALS = {
    "bos_token": "[CLS]",
    "eos_token": "[SEP]",
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
DEBERTA_V2_RESERVED = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
_DEBERTA_V2_CLASSES = ("DebertaV2Tokenizer", "DebertaV2TokenizerFast")
# llama.cpp names the pre-tokenizer regex a byte-level vocabulary was trained with; files that name
# none of these use GPT-2's regex, which is what ByteLevel(use_regex=True) applies.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT}
_GGUF_DEFAULT_SPLIT = {"gpt2", "smollm", "default", None}


def token_content(value: Any) -> str | None:
    """The text of a special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def is_japanese(config: dict[str, Any]) -> bool:
    """Whether tokenizer_config.json describes a cl-tohoku Japanese tokenizer (MeCab words first)."""
    return config.get("tokenizer_class") == "BertJapaneseTokenizer" or "word_tokenizer_type" in config


def is_deberta_v2(config: dict[str, Any]) -> bool:
    """Whether a folder's settings name DeBERTa-v2 / v3's tokenizer, by class or, lacking one, by model type.

    microsoft/deberta-v3-* ship a tokenizer_config.json without `tokenizer_class`; transformers then goes by
    config.json's `model_type`, and so do we.
    """
    name = config.get("tokenizer_class")
    if name:
        return name in _DEBERTA_V2_CLASSES
    return config.get("model_type") == "deberta-v2"


def read_json(path: Path) -> Any:
    """Parse a JSON file, naming the file in the error.

    Raises:
        ValueError: when the file is not valid JSON.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a valid JSON file: {error}") from error


def bert_template(cls_token: str, sep_token: str, vocab: dict[str, int]) -> processors.TemplateProcessing:
    """`[CLS] A [SEP]` and `[CLS] A [SEP] B [SEP]`, segment ids 0 for A and 1 for B."""
    for token in (cls_token, sep_token):
        if token not in vocab:
            raise ValueError(f"The special token {token!r} is not in the vocabulary")
    return processors.TemplateProcessing(
        single=f"{cls_token}:0 $A:0 {sep_token}:0",
        pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
        special_tokens=[(cls_token, vocab[cls_token]), (sep_token, vocab[sep_token])],
    )


def sequence_template(
    bos_token: str | None, eos_token: str | None, vocab: dict[str, int]
) -> processors.TemplateProcessing:
    """`[bos] A [eos]` (and `[bos] A [eos] [bos] B [eos]` for pairs); either special token may be absent."""
    bos = f"{bos_token}:0 " if bos_token else ""
    eos = f" {eos_token}:0" if eos_token else ""
    bos_b = f" {bos_token}:1" if bos_token else ""
    eos_b = f" {eos_token}:1" if eos_token else ""
    specials = [(token, vocab[token]) for token in dict.fromkeys(t for t in (bos_token, eos_token) if t)]
    return processors.TemplateProcessing(
        single=f"{bos}$A:0{eos}", pair=f"{bos}$A:0{eos}{bos_b} $B:1{eos_b}", special_tokens=specials
    )


# ---------------------------------------------------------------------------------------------------
# WordPiece (BERT vocab.txt, cl-tohoku Japanese)
# ---------------------------------------------------------------------------------------------------


def read_vocab_txt(path: Path) -> dict[str, int]:
    """One token per line; the line number is the id.

    Raises:
        ValueError: when the file is empty or not UTF-8.
    """
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 (byte offset {error.start}); a vocab.txt holds one token a line"
        ) from error
    if lines and lines[-1] == "":
        lines.pop()
    vocab: dict[str, int] = {}
    for index, token in enumerate(lines):
        vocab.setdefault(token.rstrip("\r"), index)
    if not vocab:
        raise ValueError(f"{path} is empty; a vocab.txt holds one token a line")
    return vocab


def build_bert(vocab: dict[str, int], config: dict[str, Any]) -> tuple[Backend, dict[str, Any]]:
    """BERT's WordPiece: BertNormalizer (lower-casing, accents, CJK split as configured), BertPreTokenizer."""
    config = {**_BERT_SPECIALS, "tokenizer_class": "BertTokenizer", **config}
    do_lower_case = config.get("do_lower_case", True)
    config["do_lower_case"] = do_lower_case
    unk = token_content(config["unk_token"])
    backend = Backend(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"),  # None: follow lowercase, as the original BERT does
        lowercase=do_lower_case,
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.post_processor = bert_template(
        token_content(config["cls_token"]), token_content(config["sep_token"]), vocab
    )
    config.setdefault("model_input_names", BERT_INPUT_NAMES)
    return backend, config


def build_japanese(vocab: dict[str, int] | None, config: dict[str, Any], backend: Backend | None = None):
    """cl-tohoku: NFKC, MeCab words, then WordPiece (or single characters) inside each word.

    Args:
        vocab: token -> id from vocab.txt, used when `backend` is None.
        config: tokenizer_config.json with `word_tokenizer_type: mecab` and `mecab_kwargs`.
        backend: a tokenizer.json saved by bunmyaku; only its pre-tokenizer is replaced.

    Returns:
        `(backend, config)`.
    """
    config = {**_BERT_SPECIALS, "tokenizer_class": "BertJapaneseTokenizer", "do_lower_case": False, **config}
    settings, normalize_text = mecab_settings(config)
    config.setdefault("word_tokenizer_type", "mecab")
    config.setdefault("subword_tokenizer_type", "character" if settings["split_characters"] else "wordpiece")
    config.setdefault("mecab_kwargs", {"mecab_dic": settings["mecab_dic"]})
    if backend is None:
        assert vocab is not None
        unk = token_content(config["unk_token"])
        if settings["split_characters"]:
            model = models.WordLevel(vocab, unk_token=unk)
        else:
            model = models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100)
        backend = Backend(model)
        backend.normalizer = normalizers.NFKC() if normalize_text else None
        backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        backend.post_processor = bert_template(
            token_content(config["cls_token"]), token_content(config["sep_token"]), vocab
        )
    backend.pre_tokenizer = mecab_pre_tokenizer(**settings)
    config.setdefault("model_input_names", BERT_INPUT_NAMES)
    return backend, config


# ---------------------------------------------------------------------------------------------------
# Byte-level BPE (GPT-2, RoBERTa)
# ---------------------------------------------------------------------------------------------------


def read_merges(path: Path) -> list[tuple[str, str]]:
    """GPT-2 merges: a `#version` header, then `left right` a line.

    Raises:
        ValueError: on a line that is not two space-separated symbols.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 (byte offset {error.start}); merges hold two symbols a line") from None
    merges = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: a merge is two symbols separated by one space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def build_byte_level_bpe(
    vocab: dict[str, int], merges: list[tuple[str, str]], config: dict[str, Any]
) -> tuple[Backend, dict[str, Any]]:
    """GPT-2's byte-level BPE; RoBERTa's `<s> A </s></s> B </s>` when the config names RoBERTa."""
    # Longformer is RoBERTa with sparse attention: the same tokenizer (LongformerTokenizer), the same specials
    tokenizer_class = str(config.get("tokenizer_class", "")).lower()
    is_roberta = "roberta" in tokenizer_class or "longformer" in tokenizer_class
    is_roberta = is_roberta or config.get("model_type") in ("roberta", "longformer")
    defaults = _ROBERTA_SPECIALS if is_roberta else _GPT2_SPECIALS
    config = {**defaults, "tokenizer_class": "RobertaTokenizer" if is_roberta else "GPT2Tokenizer", **config}
    config.pop("model_type", None)
    add_prefix_space = bool(config.get("add_prefix_space", False))
    backend = Backend(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    if is_roberta:
        sep, cls = token_content(config["sep_token"]), token_content(config["cls_token"])
        specials = [token_content(config[key]) for key in _ROBERTA_SPECIALS]
        # RoBERTa's specials may be missing from a GPT-2 vocabulary; they then get new ids, as in transformers.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(specials)])
        backend.post_processor = processors.RobertaProcessing(
            (sep, backend.token_to_id(sep)),
            (cls, backend.token_to_id(cls)),
            trim_offsets=bool(config.get("trim_offsets", True)),
            add_prefix_space=add_prefix_space,
        )
    else:
        backend.post_processor = sequence_template(
            token_content(config["bos_token"]) if config.get("add_bos_token") else None,
            token_content(config["eos_token"]) if config.get("add_eos_token") else None,
            vocab,
        )
    config.setdefault("model_input_names", CAUSAL_INPUT_NAMES)
    return backend, config


# ---------------------------------------------------------------------------------------------------
# GGUF (llama.cpp files carry their tokenizer in metadata)
# ---------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (Radford et al. 2019, the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def read_gguf_tokenizer(path: Path) -> dict[str, Any]:
    """The `tokenizer.*` metadata of a GGUF file, keys without the `tokenizer.` prefix.

    Raises:
        ValueError: when the file is not GGUF or holds no tokenizer.
    """
    try:
        from gguf import GGUFReader
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("Reading GGUF files needs the gguf package: pip install 'bunmyaku[gguf]'") from error
    try:
        reader = GGUFReader(str(path))
    except Exception as error:  # the reader raises bare ValueErrors and struct errors on a bad header
        raise ValueError(f"{path} is not a readable GGUF file: {error}") from error
    meta = {
        name.removeprefix("tokenizer."): field.contents()
        for name, field in reader.fields.items()
        if name.startswith("tokenizer.")
    }
    if "ggml.tokens" not in meta:
        raise ValueError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens metadata)")
    return meta


def build_gguf(meta: dict[str, Any]) -> tuple[Backend, dict[str, Any]]:
    """A byte-level BPE (`tokenizer.ggml.model == "gpt2"`) or SentencePiece BPE (`"llama"`) from GGUF metadata."""
    kind = meta.get("ggml.model")
    tokens: list[str] = list(meta["ggml.tokens"])
    token_types = list(meta.get("ggml.token_type") or [1] * len(tokens))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_input_names": CAUSAL_INPUT_NAMES}
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        index = meta.get(f"ggml.{key}_token_id")
        if index is not None:
            config[name] = tokens[index]
    if meta.get("chat_template"):
        config["chat_template"] = meta["chat_template"]
    add_bos = bool(meta.get("ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("ggml.add_eos_token", False))
    config["add_bos_token"], config["add_eos_token"] = add_bos, add_eos

    if kind == "gpt2":
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        # Tokens outside the byte alphabet are stored as raw text; respell them so the merges find them.
        spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
        vocab = {token: index for index, token in enumerate(spelled)}
        merges = [tuple(merge.split(" ")) for merge in meta.get("ggml.merges", [])]
        backend = Backend(
            models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
        )
        split = meta.get("ggml.pre")
        if split in _GGUF_SPLITS:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(_GGUF_SPLITS[split]), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        else:
            if split not in _GGUF_DEFAULT_SPLIT:
                logger.warning("GGUF pre-tokenizer %r is not known; splitting words with GPT-2's regex", split)
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        control_ok = alphabet
    elif kind == "llama":
        scores = list(meta.get("ggml.scores") or [0.0] * len(tokens))
        vocab = {token: index for index, token in enumerate(tokens)}
        backend = build_sentencepiece_bpe(vocab, scores, unk_token=config.get("unk_token"), byte_fallback=True)
        control_ok = None
    else:
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2', 'llama'")

    # llama.cpp token types: 3 = control (special), 4 = user-defined (an added, non-special token).
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, kind_id in zip(tokens, token_types, strict=True)
        if kind_id == 3 and (control_ok is None or set(t) <= control_ok)
    ]
    backend.add_special_tokens(control)
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind_id in zip(tokens, token_types, strict=True)
            if kind_id == 4
        ]
    )
    backend.post_processor = sequence_template(
        config.get("bos_token") if add_bos else None, config.get("eos_token") if add_eos else None, vocab
    )
    return backend, config


# ---------------------------------------------------------------------------------------------------
# SentencePiece .model files (Unigram and BPE)
# ---------------------------------------------------------------------------------------------------


def build_sentencepiece_bpe(
    vocab: dict[str, int], scores: list[float], unk_token: str | None, byte_fallback: bool
) -> Backend:
    """SentencePiece BPE: merges recovered from the vocabulary, best-scored merged piece first."""
    ranked = []
    for merged, index in vocab.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[index], vocab[left], vocab[right], left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    model = models.BPE(vocab, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=byte_fallback)
    backend = Backend(model)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return backend


def build_sentencepiece(path: Path) -> tuple[Backend, dict[str, Any]]:
    """A SentencePiece `.model` (Unigram or BPE) rebuilt on `tokenizers` models.

    The normaliser replays SentencePiece's own: its precompiled character map (NFKC by default), then
    the whitespace clean-up and the `▁` word-boundary prefix.

    Raises:
        ValueError: when the file is not a SentencePiece model.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "Reading .model files needs sentencepiece and protobuf: pip install sentencepiece protobuf"
        ) from error
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as error:  # protobuf raises its own DecodeError
        raise ValueError(f"{path} is not a SentencePiece model: {error}") from error
    if not proto.pieces:
        raise ValueError(f"{path} is not a SentencePiece model (no pieces)")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    # protobuf hands back bytes for a piece that is not UTF-8: the wire format survived a damaged payload.
    broken = next((index for index, (piece, _, _) in enumerate(pieces) if not isinstance(piece, str)), None)
    if broken is not None:
        raise ValueError(f"{path} is damaged: piece {broken} ({pieces[broken][0]!r:.40}) is not UTF-8 text")
    # SentencePiece piece types: 2 = unknown, 3 = control, 4 = user-defined, 6 = byte.
    unk_id = next((i for i, (_, _, t) in enumerate(pieces) if t == 2), 0)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    byte_fallback = trainer.byte_fallback
    if trainer.model_type == 1:  # UNIGRAM
        backend = Backend(models.Unigram([(p, s) for p, s, _ in pieces], unk_id=unk_id, byte_fallback=byte_fallback))
    elif trainer.model_type == 2:  # BPE
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        backend = build_sentencepiece_bpe(vocab, [s for _, s, _ in pieces], pieces[unk_id][0], byte_fallback)
    else:
        raise ValueError(f"{path}: SentencePiece model type {trainer.model_type} is not supported (Unigram or BPE)")

    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    backend.normalizer = normalizers.Sequence(steps) if steps else None
    prepend = "always" if norm.add_dummy_prefix else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme=prepend, split=trainer.split_by_whitespace
    )
    metaspace = decoders.Metaspace(replacement="▁", prepend_scheme=prepend)
    backend.decoder = (
        decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), metaspace]) if byte_fallback else metaspace
    )
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, _, t in pieces if t == 3])
    backend.add_tokens([AddedToken(p, special=False, normalized=False) for p, _, t in pieces if t == 4])

    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": pieces[unk_id][0]}
    for name, index in (("bos_token", trainer.bos_id), ("eos_token", trainer.eos_id), ("pad_token", trainer.pad_id)):
        if 0 <= index < len(pieces):
            config[name] = pieces[index][0]
    # SentencePiece itself adds no special tokens; a folder's tokenizer_config.json may ask for a template.
    backend.post_processor = sequence_template(None, None, {})
    config["model_input_names"] = CAUSAL_INPUT_NAMES
    return backend, config


def set_deberta_v2_pipeline(backend: Backend, config: dict[str, Any]) -> None:
    """DeBERTa-v2's text pipeline on `backend`, as transformers' `DebertaV2Tokenizer` builds it.

    transformers 5 rebuilds this pipeline from tokenizer_config.json whenever it loads a DeBERTa-v2 folder (the
    normaliser stored in tokenizer.json or spm.model is ignored), so we build the same one from the same keys:
    optional lower-casing, runs of whitespace and every tab or newline to one space, NFC (not SentencePiece's
    NFKC: full-width letters stay distinct), trailing spaces stripped; words split at spaces (and at each
    punctuation character with `split_by_punct`), each prefixed with `▁` (`add_prefix_space`, default on,
    else only the first word).
    """
    steps = [normalizers.Lowercase()] if config.get("do_lower_case") else []
    steps += [
        normalizers.Replace(Regex(r"\s{2,}|[\n\r\t]"), " "),
        normalizers.NFC(),
        normalizers.Strip(left=False, right=True),
    ]
    backend.normalizer = normalizers.Sequence(steps)
    prepend = "always" if config.get("add_prefix_space", True) else "first"
    words = [pre_tokenizers.Punctuation(behavior="isolated")] if config.get("split_by_punct") else []
    words.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend))
    backend.pre_tokenizer = pre_tokenizers.Sequence(words)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend)


def build_deberta_v2(backend: Backend, config: dict[str, Any], source: Path | None) -> tuple[Backend, dict[str, Any]]:
    """A DeBERTa-v2 / v3 tokenizer from the Unigram model of its spm.model or tokenizer.json.

    Only the pieces and their scores are taken from `backend` (built by :func:`build_sentencepiece` or read
    from tokenizer.json); the text pipeline comes from the folder's settings (:func:`set_deberta_v2_pipeline`),
    the template is `[CLS] A [SEP]` / `[CLS] A [SEP] B [SEP]` with segment ids, and a `[MASK]` missing from
    the pieces is added after the last one when the `Tokenizer` registers its special tokens.

    Args:
        backend: a tokenizer whose model is the vocabulary's Unigram.
        config: tokenizer_config.json / special_tokens_map.json settings (`do_lower_case`, `split_by_punct`,
            `add_prefix_space`, special tokens); DeBERTa's special tokens fill in the missing ones.
        source: the file the vocabulary came from, for error messages.

    Raises:
        ValueError: when the vocabulary is not a Unigram, or lacks the `[CLS]` / `[SEP]` pieces.
    """
    where = source or "The DeBERTa-v2 vocabulary"
    state = json.loads(backend.model.__getstate__())
    if state.get("type") != "Unigram":
        raise ValueError(f"{where}: a DeBERTa-v2 tokenizer is a SentencePiece Unigram model, got {state.get('type')}")
    config = {key: value for key, value in config.items() if key not in ("model_type", "tokenizer_class")}
    config = {**DEBERTA_V2_SPECIALS, "do_lower_case": False, "split_by_punct": False, **config}
    config["tokenizer_class"] = "DebertaV2Tokenizer"
    config.setdefault("model_input_names", BERT_INPUT_NAMES)
    # transformers takes the unknown piece by name, and never falls back to bytes.
    unk_id = backend.model.token_to_id(token_content(config["unk_token"]))
    if unk_id is None:
        unk_id = state.get("unk_id")
    if unk_id != state.get("unk_id") or state.get("byte_fallback"):
        pieces = [(piece, score) for piece, score in state["vocab"]]
        backend.model = models.Unigram(pieces, unk_id=unk_id, byte_fallback=False)
    set_deberta_v2_pipeline(backend, config)
    cls_token, sep_token = token_content(config["cls_token"]), token_content(config["sep_token"])
    vocab = {token: backend.token_to_id(token) for token in (cls_token, sep_token)}
    missing = [token for token, index in vocab.items() if index is None]
    if missing:
        raise ValueError(f"{where}: a DeBERTa-v2 vocabulary must hold {missing} (the [CLS] A [SEP] template)")
    backend.post_processor = bert_template(cls_token, sep_token, vocab)
    return backend, config


def build_marian(source_spm: Path, vocab: dict[str, int], config: dict[str, Any]) -> tuple[Backend, dict[str, Any]]:
    """A MarianMT folder: SentencePiece segmentation from ``source.spm``, ids from the shared ``vocab.json``.

    Marian models index their embeddings by ``vocab.json`` (one vocabulary for both languages), not by the
    SentencePiece ids. The Unigram model is rebuilt over ``vocab.json``'s pieces in its order, each scored
    as in ``source.spm``. Pieces the source model does not have (target-language ones) must keep their ids,
    for decoding translations, but must never be chosen when segmenting source text: they are stored behind
    a NUL character that normalised text never contains, and the decoder drops it again. ``</s>`` ends every
    sequence.

    Raises:
        ValueError: when ``vocab.json`` lacks ``<unk>`` or ``</s>`` or its ids have gaps.
    """
    backend, defaults = build_sentencepiece(source_spm)
    for token in ("<unk>", "</s>"):
        if token not in vocab:
            raise ValueError(f"{source_spm.parent / 'vocab.json'} has no {token!r} entry")
    ordered = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in ordered] != list(range(len(ordered))):
        raise ValueError(f"{source_spm.parent / 'vocab.json'}: ids must run 0..{len(ordered) - 1} without gaps")
    scores = _sentencepiece_scores(source_spm)
    # An unreachable piece keeps the lowest real score, so it leaves SentencePiece's unknown-piece penalty alone.
    lowest = min(scores.values())
    specials = [t for t in ("</s>", "<unk>", "<pad>") if t in vocab]  # matched whole, as added tokens
    pieces = [(p, scores.get(p, lowest)) if p in scores or p in specials else (_HIDDEN + p, lowest) for p, _ in ordered]
    backend.model = models.Unigram(pieces, unk_id=vocab["<unk>"])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.post_processor = sequence_template(None, "</s>", vocab)
    backend.decoder = decoders.Sequence([decoders.Replace(_HIDDEN, ""), backend.decoder])
    config = {**defaults, "tokenizer_class": "MarianTokenizer", "eos_token": "</s>", "unk_token": "<unk>", **config}
    if "<pad>" in vocab:
        config.setdefault("pad_token", "<pad>")
    config["model_input_names"] = CAUSAL_INPUT_NAMES
    return backend, config


_HIDDEN = "\x00"


def _sentencepiece_scores(path: Path) -> dict[str, float]:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return {p.piece: p.score for p in proto.pieces}
