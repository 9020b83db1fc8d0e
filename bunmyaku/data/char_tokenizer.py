"""A character-level tokenizer (nanoGPT's ``shakespeare_char``): one id per distinct character of a corpus.

It is a `tokenizers` WordLevel model over single characters (a Split pre-tokenizer isolates each one), so it
saves as an ordinary ``tokenizer.json`` that ``bunmyaku.Tokenizer`` and ``transformers.AutoTokenizer`` load.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from bunmyaku.data.corpus import read_documents

EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"


def build_char_tokenizer(files: Iterable[str | os.PathLike], model_max_length: int | None = None):
    """Build a character tokenizer whose vocabulary is every character of ``files``, sorted, then EOS and UNK.

    Args:
        files: UTF-8 text or JSONL files (read as :func:`bunmyaku.data.read_documents` reads them).
        model_max_length: the length limit saved with the tokenizer.

    Returns:
        A :class:`bunmyaku.Tokenizer` with ``eos_token`` ``<|endoftext|>`` and ``unk_token`` ``<unk>``.

    Raises:
        ValueError: when the files hold no text.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from bunmyaku.tokenization import Tokenizer

    chars: set[str] = set()
    for path in files:
        for text in read_documents(path, doc_split="file"):
            chars.update(text)
    if not chars:
        raise ValueError(f"no characters to build a vocabulary from in {list(files)}")
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    vocab[EOS_TOKEN] = len(vocab)
    vocab[UNK_TOKEN] = len(vocab)
    backend = Backend(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([EOS_TOKEN, UNK_TOKEN])
    config = {
        "eos_token": EOS_TOKEN,
        "bos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "model_max_length": model_max_length,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    return Tokenizer(backend, config)
