"""`bunmyaku.Tokenizer`: a thin layer over `tokenizers.Tokenizer` with the Hugging Face calling convention.

All tokenization runs in the Rust library; this class only loads the vocabulary formats our models use,
keeps the special-token bookkeeping, turns `tokenizers.Encoding`s into lists (tensors on request, as in
transformers), and saves folders that `transformers.AutoTokenizer` reads back to the same ids.
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import AddedToken, Encoding, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from bunmyaku.hub.files import resolve_path, write_text_atomic
from bunmyaku.tokenization import formats

logger = logging.getLogger(__name__)

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' stand-in for "no limit" is 1e30; anything this large means the model sets none.
_NO_LIMIT = 10**12
# Classes whose models take segment ids (`token_type_ids`) when tokenizer_config.json does not list inputs.
_SEGMENT_CLASSES = ("Bert", "Electra", "Deberta", "Albert", "XLNet", "Funnel", "MobileBert", "ConvBert", "Layout")
_NO_SEGMENT_CLASSES = ("DistilBert", "Roberta", "Camembert", "XLMRoberta")
_SENTENCEPIECE_NAMES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "spm.model", "source.spm")

TextInput = str | Sequence[str]
Truncation = bool | Literal["longest_first", "only_first", "only_second", "do_not_truncate"] | None
Padding = bool | Literal["longest", "max_length", "do_not_pad"]


class BatchEncoding(dict):
    """The dict `Tokenizer.__call__` returns, keeping the `tokenizers.Encoding`s for word and sequence ids.

    Values are Python lists by default, torch tensors with `return_tensors="pt"`, numpy arrays with "np";
    keys are also attributes (`enc.input_ids`).

    Keys, for B sequences of T tokens: `input_ids` (B, T), `attention_mask` (B, T), `token_type_ids` (B, T)
    when the model takes segments, and on request `offset_mapping` (B, T, 2) character spans,
    `special_tokens_mask` (B, T), `overflow_to_sample_mapping` (B,) the input each window came from.
    """

    def __init__(
        self,
        data: dict[str, Any],
        encodings: list[Encoding],
        full_encodings: Callable[[], list[Encoding]] | None = None,
    ) -> None:
        super().__init__(data)
        self.encodings = encodings
        # The fast encoding path tracks no words; this re-encodes with them, once, if someone asks.
        self._full_encodings = full_encodings

    def __getattr__(self, name: str) -> Any:
        """`enc.input_ids` for `enc["input_ids"]`, as transformers' BatchEncoding allows."""
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no attribute or key {name!r}; keys: {sorted(self)}") from None

    def word_ids(self, batch_index: int = 0) -> list[int | None]:
        """The word each token of sequence `batch_index` belongs to (None for special and pad tokens)."""
        if self._full_encodings is not None:
            self.encodings, self._full_encodings = self._full_encodings(), None
        return self.encodings[batch_index].word_ids

    def sequence_ids(self, batch_index: int = 0) -> list[int | None]:
        """0 for tokens of the first text, 1 for the second, None for special and pad tokens."""
        return self.encodings[batch_index].sequence_ids

    def to(self, device: str | torch.device) -> BatchEncoding:
        """The same encoding with every tensor moved to `device`."""
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()}
        return BatchEncoding(moved, self.encodings, self._full_encodings)


def _rows(encodings: list[Encoding], overflowing: bool) -> tuple[list[Encoding], list[int]]:
    """The encodings with their overflowing windows as rows of their own, and the input of each row."""
    if not overflowing:
        return encodings, list(range(len(encodings)))
    rows, sample_of_row = [], []
    for index, encoding in enumerate(encodings):
        rows += [encoding, *encoding.overflowing]
        sample_of_row += [index] * (1 + len(encoding.overflowing))
    return rows, sample_of_row


def _special_token_property(key: str) -> property:
    def get_token(self: Tokenizer) -> str | None:
        return self._special.get(key)

    def set_token(self: Tokenizer, value: str | None) -> None:
        if value is None:
            self._special.pop(key, None)
        else:
            self.add_special_tokens({key: value})

    def get_id(self: Tokenizer) -> int | None:
        token = self._special.get(key)
        return None if token is None else self.backend.token_to_id(token)

    return property(get_token, set_token, doc=f"The {key.replace('_', ' ')} (None when the tokenizer has none)."), (
        property(get_id, doc=f"The id of the {key.replace('_', ' ')} (None when the tokenizer has none).")
    )


class Tokenizer:
    """A `tokenizers.Tokenizer` with the special tokens and settings of a Hugging Face tokenizer folder.

    Calling it encodes text the way `transformers.AutoTokenizer` does, to the same ids and offsets.
    Padding and truncation are set on the shared backend per call, so share one instance between
    threads only when they use the same settings.

    Args:
        backend: the Rust tokenizer doing the work.
        config: settings in the shape of tokenizer_config.json (special tokens, `model_max_length`,
            `padding_side`, `chat_template`, `model_input_names`, ...); unknown keys are kept and saved.
    """

    bos_token, bos_token_id = _special_token_property("bos_token")
    eos_token, eos_token_id = _special_token_property("eos_token")
    unk_token, unk_token_id = _special_token_property("unk_token")
    sep_token, sep_token_id = _special_token_property("sep_token")
    pad_token, pad_token_id = _special_token_property("pad_token")
    cls_token, cls_token_id = _special_token_property("cls_token")
    mask_token, mask_token_id = _special_token_property("mask_token")

    def __init__(self, backend: Backend, config: dict[str, Any] | None = None) -> None:
        config = dict(config or {})
        self.backend = backend
        self._special: dict[str, str] = {}
        for key in SPECIAL_TOKEN_KEYS:
            token = formats.token_content(config.pop(key, None))
            if token:
                self._special[key] = token
        extra = config.pop("additional_special_tokens", None) or config.pop("extra_special_tokens", None) or []
        self.additional_special_tokens = [formats.token_content(t) for t in extra if isinstance(t, (str, dict))]
        self.padding_side: Literal["right", "left"] = config.pop("padding_side", "right")
        self.truncation_side: Literal["right", "left"] = config.pop("truncation_side", "right")
        max_length = config.pop("model_max_length", None)
        self.model_max_length: int | None = int(max_length) if max_length and max_length < _NO_LIMIT else None
        self.chat_template: str | None = config.pop("chat_template", None)
        self.clean_up_tokenization_spaces = bool(config.pop("clean_up_tokenization_spaces", False))
        self.model_input_names: list[str] = list(config.pop("model_input_names", None) or self._default_inputs(config))
        added = config.pop("added_tokens_decoder", None) or {}
        # Whatever remains (do_lower_case, tokenizer_class, mecab_kwargs, ...) is written back on save.
        self.init_kwargs = config
        self._register_added_tokens(added)
        self._settings: tuple | None = None
        # NFKC before MeCab composes "ﾃﾞ" into "デ"; the Rust alignment then drops the voiced mark from the span.
        self._composes_characters = formats.is_japanese(self.init_kwargs)
        self._words_backend = self._japanese_words_backend() if self._composes_characters else None
        backend.no_truncation()
        backend.no_padding()

    # ------------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer folder or file in any format our models use.

        Args:
            path: a folder (tokenizer.json; BERT vocab.txt; vocab.json + merges.txt; encoder.json + vocab.bpe;
                a SentencePiece .model; a cl-tohoku Japanese folder; a single .gguf), a file of one of those
                kinds, or a hub repo id when online (``"gpt2"``, ``"org/name"``, ``"hf://org/name"``; see
                :func:`bunmyaku.hub.files.resolve_path`).

        Raises:
            FileNotFoundError: when the path does not exist or holds no vocabulary.
            ValueError: when a vocabulary file is malformed.
        """
        path = resolve_path(path, allow_patterns=_HUB_TOKENIZER_FILES, kind="tokenizer")
        if path.is_file():
            return cls._from_file(path, {})
        return cls._from_folder(path)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer embedded in a GGUF file (vocabulary, merges, special tokens, chat template)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No GGUF file at {path}")
        return cls(*formats.build_gguf(formats.read_gguf_tokenizer(path)))

    @classmethod
    def from_sentencepiece(cls, path: str | os.PathLike, config: dict[str, Any] | None = None) -> Tokenizer:
        """A SentencePiece `.model` (Unigram or BPE), optionally with tokenizer_config.json settings.

        Settings that name DeBERTa-v2 (`tokenizer_class: DebertaV2Tokenizer`, or `model_type: deberta-v2`) give
        DeBERTa-v2 / v3's pipeline and template (see :func:`formats.build_deberta_v2`).

        Raises:
            FileNotFoundError: when there is no file at `path`.
            ValueError: when the file is not a SentencePiece model (damaged, truncated, another format).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No SentencePiece model at {path}")
        backend, defaults = formats.build_sentencepiece(path)
        if formats.is_deberta_v2(config or {}):
            return cls(*formats.build_deberta_v2(backend, config or {}, path))
        config = {**defaults, **(config or {})}
        cls_token, sep_token = (
            formats.token_content(config.get("cls_token")),
            formats.token_content(config.get("sep_token")),
        )
        vocab = backend.get_vocab()
        if cls_token in vocab and sep_token in vocab:
            # ALBERT style: the folder asks for [CLS] A [SEP] B [SEP].
            backend.post_processor = formats.bert_template(cls_token, sep_token, vocab)
            config.setdefault("model_input_names", formats.BERT_INPUT_NAMES)
        elif config.get("add_eos_token") or "Marian" in str(config.get("tokenizer_class", "")):
            backend.post_processor = formats.sequence_template(
                None, formats.token_content(config.get("eos_token")), vocab
            )
        return cls(backend, config)

    @classmethod
    def _from_file(cls, path: Path, config: dict[str, Any]) -> Tokenizer:
        if path.suffix == ".gguf":
            return cls.from_gguf(path)
        if path.suffix in (".model", ".spm"):
            return cls.from_sentencepiece(path, config)
        if path.suffix == ".json":
            if path.name in ("vocab.json", "encoder.json"):
                raise ValueError(f"{path} is half of a BPE vocabulary; load its folder, which also holds the merges")
            try:
                backend = Backend.from_file(str(path))
            except Exception as error:  # tokenizers raises a bare Exception on a malformed file
                raise ValueError(f"{path} is not a valid tokenizer.json: {error}") from error
            if formats.is_japanese(config):
                backend, config = formats.build_japanese(None, config, backend)
            elif formats.is_deberta_v2(config):
                backend, config = formats.build_deberta_v2(backend, config, path)
            return cls(backend, config)
        if path.suffix == ".txt":
            if formats.is_japanese(config):
                return cls(*formats.build_japanese(formats.read_vocab_txt(path), config))
            return cls(*formats.build_bert(formats.read_vocab_txt(path), config))
        raise ValueError(f"Cannot tell the tokenizer format of {path}; expected .json, .txt, .model or .gguf")

    @classmethod
    def _from_folder(cls, folder: Path) -> Tokenizer:
        config: dict[str, Any] = {}
        if (folder / "special_tokens_map.json").is_file():
            config.update(formats.read_json(folder / "special_tokens_map.json"))
        if (folder / "tokenizer_config.json").is_file():
            config.update(formats.read_json(folder / "tokenizer_config.json"))
        model_config = folder / "config.json"
        if "tokenizer_class" not in config and model_config.is_file():
            config["model_type"] = formats.read_json(model_config).get("model_type")
        if formats.is_deberta_v2(config):
            # Whichever file holds the pieces, the pipeline and template are DeBERTa's, as in transformers.
            config.pop("model_type", None)
            config["tokenizer_class"] = "DebertaV2Tokenizer"

        if (folder / "tokenizer.json").is_file():
            config.pop("model_type", None)
            return cls._from_file(folder / "tokenizer.json", config)
        if (folder / "vocab.txt").is_file():
            config.pop("model_type", None)
            return cls._from_file(folder / "vocab.txt", config)
        if (folder / "source.spm").is_file() and (folder / "vocab.json").is_file():  # MarianMT
            vocab = formats.read_json(folder / "vocab.json")
            if not isinstance(vocab, dict) or not vocab:
                raise ValueError(f"{folder / 'vocab.json'} must be a JSON object mapping pieces to ids")
            config.pop("model_type", None)
            return cls(*formats.build_marian(folder / "source.spm", vocab, config))
        for vocab_name, merges_name in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            if (folder / vocab_name).is_file():
                if not (folder / merges_name).is_file():
                    raise FileNotFoundError(f"{folder / vocab_name} needs its merges file {folder / merges_name}")
                vocab = formats.read_json(folder / vocab_name)
                if not isinstance(vocab, dict) or not vocab:
                    raise ValueError(f"{folder / vocab_name} must be a JSON object mapping tokens to ids")
                merges = formats.read_merges(folder / merges_name)
                return cls(*formats.build_byte_level_bpe(vocab, merges, config))
        for name in _SENTENCEPIECE_NAMES:
            if (folder / name).is_file():
                config.pop("model_type", None)
                return cls.from_sentencepiece(folder / name, config)
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) == 1:
            return cls.from_gguf(ggufs[0])
        raise FileNotFoundError(
            f"No tokenizer in {folder}: expected tokenizer.json, vocab.txt, vocab.json + merges.txt, "
            f"encoder.json + vocab.bpe, a SentencePiece .model or one .gguf file"
        )

    def _default_inputs(self, config: dict[str, Any]) -> list[str]:
        name = str(config.get("tokenizer_class") or "")
        if name:
            segments = name.startswith(_SEGMENT_CLASSES) and not name.startswith(_NO_SEGMENT_CLASSES)
        else:
            segments = isinstance(self.backend.model, models.WordPiece)
        return formats.BERT_INPUT_NAMES if segments else formats.CAUSAL_INPUT_NAMES

    def _register_added_tokens(self, added: dict[str, Any]) -> None:
        """Make every special token atomic and skippable, as transformers does, without renumbering it."""
        present = {token.content for token in self.backend.get_added_tokens_decoder().values()}
        for entry in added.values():
            content = formats.token_content(entry)
            if content and content not in present:
                options = {k: entry[k] for k in ("lstrip", "rstrip", "single_word", "normalized") if k in entry}
                token = AddedToken(content, special=bool(entry.get("special", True)), **options)
                (self.backend.add_special_tokens if entry.get("special", True) else self.backend.add_tokens)([token])
                present.add(content)
        missing = [t for t in [*self._special.values(), *self.additional_special_tokens] if t not in present]
        if missing:
            self.backend.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)]
            )

    # ------------------------------------------------------------------------------------------------
    # Vocabulary
    # ------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Size of the vocabulary with added tokens: the embedding rows a model needs."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        """Token -> id, added tokens included."""
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def all_special_tokens(self) -> list[str]:
        """Every special token, named ones first."""
        return list(dict.fromkeys([*self._special.values(), *self.additional_special_tokens]))

    @property
    def all_special_ids(self) -> list[int]:
        """The ids of `all_special_tokens`."""
        return [self.backend.token_to_id(token) for token in self.all_special_tokens]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Id of each token; the unknown token's id for tokens outside the vocabulary."""
        if isinstance(tokens, str):
            found = self.backend.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str | list[str]:
        """Token of each id (None for ids outside the vocabulary)."""
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.backend.id_to_token(int(i)) for i in ids if int(i) not in special]

    def add_special_tokens(self, special_tokens: dict[str, str | Sequence[str]]) -> int:
        """Add or set special tokens, e.g. `{"pad_token": "<pad>", "additional_special_tokens": ["<x>"]}`.

        Returns:
            How many tokens were new to the vocabulary (the model's embeddings must grow by that much).

        Raises:
            ValueError: for a key that is not a special-token role.
        """
        tokens = []
        for key, value in special_tokens.items():
            if key == "additional_special_tokens":
                values = [value] if isinstance(value, str) else list(value)
                self.additional_special_tokens = list(dict.fromkeys([*self.additional_special_tokens, *values]))
                tokens += values
            elif key in SPECIAL_TOKEN_KEYS:
                self._special[key] = formats.token_content(value)
                tokens.append(self._special[key])
            else:
                raise ValueError(
                    f"Unknown special token role {key!r}; use one of {SPECIAL_TOKEN_KEYS} or additional_special_tokens"
                )
        before = len(self)
        self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        return len(self) - before

    def add_tokens(self, tokens: Sequence[str]) -> int:
        """Add ordinary (non-special) tokens that are never split; returns how many were new."""
        before = len(self)
        self.backend.add_tokens([AddedToken(t, normalized=True) for t in tokens])
        return len(self) - before

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        """How many tokens the template adds around one text (or a pair): the room to leave when windowing."""
        return self.backend.post_processor.num_special_tokens_to_add(pair) if self.backend.post_processor else 0

    # ------------------------------------------------------------------------------------------------
    # Encoding
    # ------------------------------------------------------------------------------------------------

    def __call__(
        self,
        text: TextInput | Sequence[Sequence[str]],
        text_pair: TextInput | Sequence[Sequence[str]] | None = None,
        *,
        add_special_tokens: bool = True,
        padding: Padding = False,
        truncation: Truncation = None,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: Literal["right", "left"] | None = None,
        return_tensors: Literal["pt", "np"] | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool = True,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
    ) -> BatchEncoding:
        """Encode one text or a batch (optionally pairs) into model inputs.

        Args:
            text: a string, a list of strings, or with `is_split_into_words` a list of words (or of lists).
            text_pair: the second text of each pair, same shape as `text`.
            add_special_tokens: wrap each sequence in the model's template (`[CLS] A [SEP]`, `<s> A </s>`...).
            padding: True / "longest" pads to the longest sequence, "max_length" to `max_length`.
            truncation: True / "longest_first", "only_first", "only_second"; None truncates only when
                `max_length` is given without padding, as transformers does.
            max_length: length limit (and padded length for "max_length"); defaults to `model_max_length`.
            stride: tokens of overlap between consecutive windows when `return_overflowing_tokens` is set.
            is_split_into_words: the texts are lists of words already split.
            pad_to_multiple_of: round padded lengths up to a multiple of this.
            padding_side: override `self.padding_side` for this call.
            return_tensors: None (default, as in transformers) for Python lists, unbatched for one text; "pt" for
                torch tensors of shape (B, T); "np" for numpy int64 arrays of shape (B, T).
            return_token_type_ids: default: whether the model takes segment ids (`model_input_names`).
            return_attention_mask: include `attention_mask` (1 for real tokens, 0 for padding).
            return_overflowing_tokens: keep the windows cut off by truncation as extra rows, with
                `overflow_to_sample_mapping` (B,) naming the input each row came from.
            return_special_tokens_mask: include `special_tokens_mask` (1 for template and pad tokens).
            return_offsets_mapping: include `offset_mapping` (B, T, 2): each token's [start, end) characters
                in its original text ((0, 0) for special tokens).
            return_length: include `length` (B,) the token count of each row.

        Returns:
            A `BatchEncoding` (a dict) with `input_ids`, `attention_mask`, `token_type_ids` and what was asked.

        Raises:
            TypeError: when a text is not a string (None in a batch, a number, ...).
            ValueError: for rows of unequal length with `return_tensors` set and no padding, padding
                without a pad token, or an unknown padding / truncation strategy.
        """
        texts, batched = _check_texts(text, "text", is_split_into_words)
        pairs = None
        if text_pair is not None:
            pairs, _ = _check_texts(text_pair, "text_pair", is_split_into_words)
            if len(pairs) != len(texts):
                raise ValueError(f"text has {len(texts)} items but text_pair has {len(pairs)}")
        self._configure(padding, truncation, max_length, stride, pad_to_multiple_of, padding_side or self.padding_side)
        inputs = texts if pairs is None else list(zip(texts, pairs, strict=True))
        # Offsets cost a little alignment bookkeeping in Rust; skip it when nobody asked for them.
        backend, split_into_words = self.backend, is_split_into_words
        if self._words_backend is not None and not return_offsets_mapping and not is_split_into_words:
            # Japanese without offsets: MeCab on whole strings in Python, then only WordPiece in Rust. Calling
            # back into Python for every word from the Rust pre-tokenizer costs far more than MeCab itself.
            backend, split_into_words = self._words_backend, True
            added = tuple(
                sorted({t.content for t in backend.get_added_tokens_decoder().values()}, key=len, reverse=True)
            )
            inputs = (
                [self._japanese_words(t, added) for t in texts]
                if pairs is None
                else [(self._japanese_words(a, added), self._japanese_words(b, added)) for a, b in inputs]
            )
        encode = backend.encode_batch if return_offsets_mapping else backend.encode_batch_fast
        try:
            encodings = encode(inputs, is_pretokenized=split_into_words, add_special_tokens=add_special_tokens)
        except Exception as error:  # tokenizers raises bare Exceptions, e.g. a side too short to truncate
            raise ValueError(f"Could not encode the batch: {error}") from error
        rows, sample_of_row = _rows(encodings, return_overflowing_tokens)
        full_encodings = None
        if not return_offsets_mapping:
            settings = (padding, truncation, max_length, stride, pad_to_multiple_of, padding_side or self.padding_side)
            original = texts if pairs is None else list(zip(texts, pairs, strict=True))

            def full_encodings() -> list[Encoding]:
                self._configure(*settings)
                full = self.backend.encode_batch(
                    original, is_pretokenized=is_split_into_words, add_special_tokens=add_special_tokens
                )
                return _rows(full, return_overflowing_tokens)[0]

        if return_token_type_ids is None:
            return_token_type_ids = "token_type_ids" in self.model_input_names

        data: dict[str, Any] = {"input_ids": [row.ids for row in rows]}
        if return_token_type_ids:
            data["token_type_ids"] = [row.type_ids for row in rows]
        if return_attention_mask:
            data["attention_mask"] = [row.attention_mask for row in rows]
        if return_special_tokens_mask:
            data["special_tokens_mask"] = [row.special_tokens_mask for row in rows]
        if return_offsets_mapping:
            data["offset_mapping"] = [row.offsets for row in rows]
            if self._composes_characters:
                owners = sample_of_row if return_overflowing_tokens else range(len(rows))
                sources = [(texts[i], pairs[i] if pairs else None) for i in owners]
                data["offset_mapping"] = [
                    _cover_combining_marks(row, source) for row, source in zip(rows, sources, strict=True)
                ]
        if return_overflowing_tokens:
            data["overflow_to_sample_mapping"] = sample_of_row
        if return_length:
            data["length"] = [len(row.ids) for row in rows]

        if return_tensors in ("pt", "np"):
            data = _to_tensors(data, return_tensors)
        elif return_tensors is not None:
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        elif not batched and not return_overflowing_tokens:
            data = {key: value[0] for key, value in data.items()}
        return BatchEncoding(data, rows, full_encodings)

    def _configure(
        self,
        padding: Padding,
        truncation: Truncation,
        max_length: int | None,
        stride: int,
        pad_to_multiple_of: int | None,
        padding_side: str,
    ) -> None:
        """Set truncation and padding on the backend, skipping the Rust calls when nothing changed."""
        if padding is True:
            padding = "longest"
        elif padding is False:
            padding = "do_not_pad"
        if padding not in ("longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if truncation is None:
            truncation = "longest_first" if max_length is not None and padding == "do_not_pad" else "do_not_truncate"
        elif truncation is True:
            truncation = "longest_first"
        elif truncation is False:
            truncation = "do_not_truncate"
        if truncation not in ("longest_first", "only_first", "only_second", "do_not_truncate"):
            raise ValueError(
                f"truncation must be True, False, 'longest_first', 'only_first' or 'only_second', got {truncation!r}"
            )
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        limit = max_length if max_length is not None else self.model_max_length
        if padding == "max_length" and limit is None:
            raise ValueError("padding='max_length' needs max_length (this tokenizer sets no model_max_length)")

        settings = (padding, truncation, limit, stride, pad_to_multiple_of, padding_side, self.truncation_side)
        if settings == self._settings:
            return
        if padding != "do_not_pad" and self.pad_token_id is None:
            raise ValueError(
                "This tokenizer has no pad token, so it cannot pad. Set one, e.g. "
                "tokenizer.pad_token = tokenizer.eos_token, or tokenizer.add_special_tokens({'pad_token': '<pad>'})"
            )
        for backend in (self.backend, self._words_backend):
            if backend is None:
                continue
            if truncation == "do_not_truncate" or limit is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(limit, stride=stride, strategy=truncation, direction=self.truncation_side)
            if padding == "do_not_pad":
                backend.no_padding()
            else:
                backend.enable_padding(
                    direction=padding_side,
                    pad_id=self.pad_token_id,
                    pad_type_id=0,
                    pad_token=self.pad_token,
                    length=limit if padding == "max_length" else None,
                    pad_to_multiple_of=pad_to_multiple_of,
                )
        self._settings = settings

    def _japanese_words_backend(self) -> Backend:
        """A copy of the backend that takes MeCab words: no normaliser or pre-tokenizer, same model and template."""
        from bunmyaku.tokenization.japanese import MecabPreTokenizer, mecab_settings

        settings, self._normalize_text = mecab_settings(self.init_kwargs)
        self._mecab = MecabPreTokenizer(**settings)
        words = Backend.from_str(self._backend_json())
        words.normalizer = None
        words.pre_tokenizer = None
        return words

    def _japanese_words(self, text: str, added: tuple[str, ...]) -> list[str]:
        """cl-tohoku's words: added tokens kept whole, NFKC, MeCab, split on whitespace, lower-cased if set."""
        words: list[str] = []
        for index, part in enumerate(_split_on(text, added)):
            if index % 2:
                words.append(part)
                continue
            if self._normalize_text:
                part = unicodedata.normalize("NFKC", part)
            for word in self._mecab.words(part):
                pieces = word.split()
                if self._mecab.split_characters:
                    pieces = [c for piece in pieces for c in piece]
                words.extend(p.lower() for p in pieces) if self._mecab.do_lower_case else words.extend(pieces)
        return words

    def encode(self, text: str, text_pair: str | None = None, add_special_tokens: bool = True) -> list[int]:
        """Ids of one text (or pair), no padding or truncation."""
        return self(text, text_pair, add_special_tokens=add_special_tokens, return_tensors=None)["input_ids"]

    def tokenize(self, text: str, text_pair: str | None = None, add_special_tokens: bool = False) -> list[str]:
        """The token strings of one text (or pair)."""
        self._configure(False, False, None, 0, None, self.padding_side)
        return self.backend.encode(text, text_pair, add_special_tokens=add_special_tokens).tokens

    # ------------------------------------------------------------------------------------------------
    # Decoding
    # ------------------------------------------------------------------------------------------------

    def decode(
        self,
        token_ids: int | Sequence[int] | torch.Tensor,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Text of one sequence of ids.

        Args:
            token_ids: (T,) ids, a list, or one id.
            skip_special_tokens: drop special tokens (template, padding, added special tokens).
            clean_up_tokenization_spaces: remove spaces before punctuation (`" ."` -> `"."`); defaults to the
                tokenizer's setting, and never applies to BPE vocabularies, whose spaces are real.
        """
        ids = _id_list(token_ids)
        return self._clean_up(
            self.backend.decode(ids, skip_special_tokens=skip_special_tokens), clean_up_tokenization_spaces
        )

    def batch_decode(
        self,
        sequences: Sequence[Sequence[int]] | torch.Tensor,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        """Text of each sequence of ids; `sequences` is (B, T) or a list of lists."""
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        texts = self.backend.decode_batch([_id_list(ids) for ids in sequences], skip_special_tokens=skip_special_tokens)
        return [self._clean_up(text, clean_up_tokenization_spaces) for text in texts]

    def _clean_up(self, text: str, enabled: bool | None) -> str:
        enabled = self.clean_up_tokenization_spaces if enabled is None else enabled
        if not enabled or isinstance(self.backend.model, models.BPE):
            return text
        for spaced, tight in _CLEAN_UPS:
            text = text.replace(spaced, tight)
        return text

    # ------------------------------------------------------------------------------------------------
    # Chat templates
    # ------------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation with the tokenizer's Jinja chat template.

        Args:
            messages: `[{"role": "user", "content": "..."}, ...]`.
            add_generation_prompt: end with the prompt that starts the assistant's turn.
            tokenize: return ids instead of text (the template writes its own special tokens, so none are added).
            chat_template: a template to use instead of the tokenizer's.
            template_kwargs: extra variables for the template.

        Raises:
            ValueError: when there is no chat template.
        """
        template = chat_template or self.chat_template
        if not template:
            raise ValueError("This tokenizer has no chat template; pass chat_template=... (a Jinja string)")
        text = _compile_template(template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            **{**self._special, **template_kwargs},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ------------------------------------------------------------------------------------------------
    # Saving
    # ------------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> list[Path]:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json (and vocab.txt for WordPiece).

        `transformers.AutoTokenizer.from_pretrained(directory)` loads the folder to the same ids. Each file is
        written to a temporary name and renamed, so a crash never leaves a half-written file.

        Returns:
            The files written.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = [
            _write_atomic(directory / "tokenizer.json", self._backend_json()),
            _write_atomic(directory / "tokenizer_config.json", _dumps(self._config_for_save())),
            _write_atomic(directory / "special_tokens_map.json", _dumps(self._special_tokens_map())),
        ]
        if isinstance(self.backend.model, (models.WordPiece, models.WordLevel)):
            vocab = self.backend.get_vocab(with_added_tokens=False)
            written.append(
                _write_atomic(directory / "vocab.txt", "".join(t + "\n" for t in sorted(vocab, key=vocab.get)))
            )
        logger.info("Saved tokenizer to %s", directory)
        return written

    def _backend_json(self) -> str:
        """tokenizer.json text without per-call padding/truncation, and a placeholder for a custom pre-tokenizer."""
        self.backend.no_truncation()
        self.backend.no_padding()
        self._settings = None
        custom = formats.is_japanese(self.init_kwargs)
        if not custom:
            return self.backend.to_str(pretty=True)
        mecab = self.backend.pre_tokenizer
        # MeCab runs in Python and cannot be serialised; the loader re-attaches it from tokenizer_config.json.
        self.backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        try:
            return self.backend.to_str(pretty=True)
        finally:
            self.backend.pre_tokenizer = mecab

    def _special_tokens_map(self) -> dict[str, Any]:
        data: dict[str, Any] = dict(self._special)
        if self.additional_special_tokens:
            data["additional_special_tokens"] = self.additional_special_tokens
        return data

    def _config_for_save(self) -> dict[str, Any]:
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self.init_kwargs}
        config.update(self._special_tokens_map())
        config["added_tokens_decoder"] = {
            str(index): {
                "content": token.content,
                "lstrip": token.lstrip,
                "normalized": token.normalized,
                "rstrip": token.rstrip,
                "single_word": token.single_word,
                "special": token.special,
            }
            for index, token in sorted(self.backend.get_added_tokens_decoder().items())
        }
        config["model_max_length"] = self.model_max_length or _NO_LIMIT
        config["padding_side"] = self.padding_side
        config["truncation_side"] = self.truncation_side
        config["clean_up_tokenization_spaces"] = self.clean_up_tokenization_spaces
        config["model_input_names"] = self.model_input_names
        if self.chat_template:
            config["chat_template"] = self.chat_template
        return config

    def __repr__(self) -> str:
        name = self.init_kwargs.get("tokenizer_class", type(self.backend.model).__name__)
        return f"Tokenizer({name}, vocab_size={len(self)}, special_tokens={self._special})"


_CLEAN_UPS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def _check_texts(texts: Any, name: str, split_into_words: bool) -> tuple[list, bool]:
    """The batch as a list, and whether the input was a batch; raises TypeError naming a bad item."""
    if split_into_words:
        if not isinstance(texts, (list, tuple)) or not texts:
            raise TypeError(f"{name} must be a non-empty list of words when is_split_into_words=True")
        if all(isinstance(word, str) for word in texts):
            return [list(texts)], False
        for index, words in enumerate(texts):
            if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
                raise TypeError(f"{name}[{index}] must be a list of str words, got {words!r:.80}")
        return [list(words) for words in texts], True
    if isinstance(texts, str):
        return [texts], False
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"{name} must be a str or a list of str, got {type(texts).__name__}")
    if not texts:
        raise ValueError(f"{name} is an empty batch; pass at least one string")
    for index, item in enumerate(texts):
        if not isinstance(item, str):
            raise TypeError(
                f"{name}[{index}] is {type(item).__name__} ({item!r:.40}), expected str; clean the batch first"
            )
    return list(texts), True


@lru_cache(maxsize=16)
def _added_token_pattern(tokens: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else None


def _split_on(text: str, tokens: tuple[str, ...]) -> list[str]:
    """`text` cut around every added token: [text, token, text, token, ..., text]."""
    pattern = _added_token_pattern(tokens)
    return pattern.split(text) if pattern is not None else [text]


@lru_cache(maxsize=4096)
def _is_combining(char: str) -> bool:
    """Whether NFKC turns `char` into combining marks only (half-width ﾞ ﾟ, U+3099, accents)."""
    composed = unicodedata.normalize("NFKC", char)
    return bool(composed) and all(unicodedata.combining(c) for c in composed)


def _cover_combining_marks(encoding: Encoding, texts: tuple[Any, Any]) -> list[tuple[int, int]]:
    """Offsets extended over the combining marks NFKC folded into the preceding character.

    `tokenizers` aligns a composed character ("ﾃﾞ" -> "デ") with its first source character only, which
    would leave the mark outside every token; this restores spans that cover the original characters.
    """
    offsets = encoding.offsets
    if isinstance(texts[0], list):  # words given pre-split: offsets are per word, nothing was composed
        return offsets
    starts = [
        {s for (s, e), seq in zip(offsets, encoding.sequence_ids, strict=True) if seq == side and e > s}
        for side in (0, 1)
    ]
    fixed = []
    for (start, end), side in zip(offsets, encoding.sequence_ids, strict=True):
        text = texts[side] if side is not None else None
        if text is not None and end > start:
            while end < len(text) and end not in starts[side] and _is_combining(text[end]):
                end += 1
        fixed.append((start, end))
    return fixed


def _to_tensors(data: dict[str, Any], kind: Literal["pt", "np"]) -> dict[str, Any]:
    """Lists of rows as (B, T) torch tensors or numpy arrays, int64 as in transformers."""
    lengths = {len(row) for row in data["input_ids"]}
    if len(lengths) > 1:
        raise ValueError(
            f"Sequences have different lengths {sorted(lengths)[:2]}...; pass padding=True (or return_tensors=None)"
        )
    if kind == "np":
        import numpy as np

        return {key: np.asarray(value, dtype=np.int64) for key, value in data.items()}
    return {key: torch.tensor(value, dtype=torch.long) for key, value in data.items()}


def _id_list(token_ids: Any) -> list[int]:
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() > 1:
            raise ValueError(f"decode takes one sequence (T,), got shape {tuple(token_ids.shape)}; use batch_decode")
        return token_ids.tolist()
    if isinstance(token_ids, int):
        return [token_ids]
    return [int(i) for i in token_ids]


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def _write_atomic(path: Path, text: str) -> Path:
    write_text_atomic(path, text)
    return path


_HUB_TOKENIZER_FILES = [
    "tokenizer*",
    "special_tokens_map.json",
    "vocab*",
    "merges.txt",
    "*.model",
    "*.spm",
    "config.json",
    "added_tokens.json",
]


@lru_cache(maxsize=8)
def _compile_template(template: str) -> Any:
    """A sandboxed Jinja template with the helpers chat templates expect (`raise_exception`, `strftime_now`)."""
    from datetime import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, indent: int | None = None) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    # trim_blocks / lstrip_blocks: templates are written for these, as transformers renders them.
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(template)
