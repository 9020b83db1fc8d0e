"""Japanese word segmentation with MeCab as a `tokenizers` pre-tokenizer.

The cl-tohoku BERT recipe splits NFKC-normalised text into MeCab words and then runs WordPiece (or a
character split) inside each word. `transformers` does this in Python and loses the character offsets;
here MeCab runs inside the `tokenizers` pipeline, so the Rust WordPiece model does the subword work and
every token keeps its offsets into the original string.
"""

from __future__ import annotations

import os
import re
from typing import Any

from tokenizers import NormalizedString, PreTokenizedString, pre_tokenizers

_NON_SPACE = re.compile(r"\S+")
#: The dictionary cl-tohoku's `mecab_kwargs` name by default when none is given.
DEFAULT_MECAB_DIC = "unidic_lite"


def _import_fugashi() -> Any:
    try:
        import fugashi
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "Japanese word segmentation needs fugashi and a dictionary: pip install 'bunmyaku[ja]' "
            "(fugashi + unidic-lite)."
        ) from error
    return fugashi


_DICTIONARIES = {"unidic_lite": "unidic_lite", "unidic": "unidic", "ipadic": "ipadic"}  # name -> package


def _check_dictionary(mecab_dic: str | None) -> None:
    if mecab_dic is not None and mecab_dic not in _DICTIONARIES:
        raise ValueError(f"mecab_dic must be one of {sorted(_DICTIONARIES)} or None, got {mecab_dic!r}")


def _dictionary_dir(mecab_dic: str | None) -> str | None:
    """The folder of a dictionary package, or None to let MeCab use its system configuration."""
    if mecab_dic is None:
        return None
    _check_dictionary(mecab_dic)
    try:
        module = __import__(_DICTIONARIES[mecab_dic])
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"The MeCab dictionary {mecab_dic!r} is not installed: pip install {mecab_dic.replace('_', '-')} "
            "(unidic-lite comes with the 'ja' extra: pip install 'bunmyaku[ja]')."
        ) from error
    return module.DICDIR


class MecabPreTokenizer:
    """Splits text into MeCab words, keeping every word's offsets into the original string.

    Used through `pre_tokenizers.PreTokenizer.custom(MecabPreTokenizer(...))`. It sees the text after the
    normaliser (NFKC for the cl-tohoku recipe), exactly as `transformers`' `MecabTokenizer` does.

    Args:
        mecab_dic: dictionary package (`"unidic_lite"`, `"unidic"`, `"ipadic"`) or None for the system one.
        mecab_option: extra MeCab command-line options.
        do_lower_case: lower-case each word after segmentation (as cl-tohoku does, so MeCab sees the
            original case).
        split_characters: split every word further into single characters (the character-level
            vocabulary of `subword_tokenizer_type: character`).
    """

    def __init__(
        self,
        mecab_dic: str | None = DEFAULT_MECAB_DIC,
        mecab_option: str | None = None,
        do_lower_case: bool = False,
        split_characters: bool = False,
    ) -> None:
        _check_dictionary(mecab_dic)
        self.mecab_dic, self.mecab_option = mecab_dic, mecab_option
        self.do_lower_case = do_lower_case
        self.split_characters = split_characters
        # MeCab starts on the first text to segment, so a tokenizer loads without fugashi (ids of an already
        # tokenized corpus, special tokens, saving: a GPU machine without MeCab can pretrain on such a corpus)
        self._tagger: Any = None

    def _start(self) -> Any:
        fugashi = _import_fugashi()
        options = self.mecab_option or ""
        dic_dir = _dictionary_dir(self.mecab_dic)
        if dic_dir is not None:
            options = f'-d "{dic_dir}" -r "{os.path.join(dic_dir, "mecabrc")}" ' + options
        # Wakati output is one space-separated string per call: far cheaper than building a Python node
        # per word, and MeCab never puts a space inside a surface (spaces are its word boundaries).
        return fugashi.GenericTagger(options + " -Owakati")

    def words(self, text: str) -> list[str]:
        """MeCab's surface forms for `text`, in order (whitespace dropped)."""
        if self._tagger is None:
            self._tagger = self._start()
        return [word for word in self._tagger.parse(text).split(" ") if word]

    def _split(self, _index: int, normalized: NormalizedString) -> list[NormalizedString]:
        text = str(normalized)
        pieces = []
        cursor = 0
        for word in self.words(text):
            # MeCab skips whitespace between words; find the word after the cursor to recover its span.
            start = text.find(word, cursor)
            assert start >= 0, f"MeCab returned {word!r}, which is not in the text after offset {cursor}"
            end = start + len(word)
            cursor = end
            if self.split_characters:
                pieces.extend(normalized.slice((i, i + 1)) for i in range(start, end))
                continue
            # A MeCab word can be whitespace itself ("\r", "\u2028"); cl-tohoku's WordPiece splits each word on
            # whitespace first, so such words yield no token and inner whitespace separates two tokens.
            for part in _NON_SPACE.finditer(word):
                piece = normalized.slice((start + part.start(), start + part.end()))
                if self.do_lower_case:
                    piece.lowercase()
                pieces.append(piece)
        if self.split_characters and self.do_lower_case:
            for piece in pieces:
                piece.lowercase()
        return pieces

    def pre_tokenize(self, pretok: PreTokenizedString) -> None:
        pretok.split(self._split)


def mecab_pre_tokenizer(
    mecab_dic: str | None = DEFAULT_MECAB_DIC,
    mecab_option: str | None = None,
    do_lower_case: bool = False,
    split_characters: bool = False,
) -> pre_tokenizers.PreTokenizer:
    """A `tokenizers` pre-tokenizer running MeCab; see `MecabPreTokenizer` for the arguments.

    Custom pre-tokenizers cannot be serialised, so a saved tokenizer.json carries a placeholder and the
    loader re-attaches MeCab from the `word_tokenizer_type: mecab` entry of tokenizer_config.json.
    """
    return pre_tokenizers.PreTokenizer.custom(
        MecabPreTokenizer(mecab_dic, mecab_option, do_lower_case=do_lower_case, split_characters=split_characters)
    )


def mecab_settings(config: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The MeCab settings a cl-tohoku tokenizer_config.json describes.

    Returns:
        The `mecab_pre_tokenizer` keyword arguments, and whether text is NFKC-normalised first.

    Raises:
        ValueError: for a word or subword tokenizer other than MeCab + WordPiece / character.
    """
    word_type = config.get("word_tokenizer_type", "basic")
    subword_type = config.get("subword_tokenizer_type", "wordpiece")
    if word_type != "mecab" or not config.get("do_word_tokenize", True):
        raise ValueError(f"Only word_tokenizer_type 'mecab' is supported for Japanese, got {word_type!r}")
    if subword_type not in ("wordpiece", "character"):
        raise ValueError(f"subword_tokenizer_type must be 'wordpiece' or 'character', got {subword_type!r}")
    kwargs = dict(config.get("mecab_kwargs") or {})
    settings = {
        "mecab_dic": kwargs.get("mecab_dic", DEFAULT_MECAB_DIC),
        "mecab_option": kwargs.get("mecab_option"),
        "do_lower_case": bool(config.get("do_lower_case", False)),
        "split_characters": subword_type == "character",
    }
    return settings, bool(kwargs.get("normalize_text", True))
