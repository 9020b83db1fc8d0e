"""A character-level tokenizer (nanoGPT's ``shakespeare_char``): one id per distinct character of a corpus.

It is a `tokenizers` WordLevel model over single characters (a Split pre-tokenizer isolates each one), so it
saves as an ordinary ``tokenizer.json`` that ``bunmyaku.Tokenizer`` and ``transformers.AutoTokenizer`` load.
"""

from __future__ import annotations

from collections.abc import Iterable

EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"


def build_char_tokenizer(texts: Iterable[str], model_max_length: int | None = None):
    """Build a character tokenizer whose vocabulary is every character of ``texts``, sorted, then EOS and UNK.

    Args:
        texts: the corpus, e.g. the documents :func:`bunmyaku.data.read_documents` reads from files.
        model_max_length: the length limit saved with the tokenizer.

    Returns:
        A :class:`bunmyaku.Tokenizer` with ``eos_token`` ``<|endoftext|>`` and ``unk_token`` ``<unk>``.

    Raises:
        ValueError: when the texts hold no character.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from bunmyaku.tokenization.tokenizer import Tokenizer

    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    if not chars:
        raise ValueError("no characters to build a character vocabulary from: the texts are empty")
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
