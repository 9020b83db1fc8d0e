"""Tokenization: a thin layer over the `tokenizers` library, plus Japanese (MeCab) pre-tokenization.

- `Tokenizer.from_pretrained(path)` loads tokenizer.json, BERT vocab.txt, GPT-2 / RoBERTa BPE files,
  SentencePiece models, GGUF files and cl-tohoku Japanese folders.
- `train_tokenizer(files, kind=...)` trains a new vocabulary and saves a folder `transformers` loads.
- `build_char_tokenizer(texts)`: one id per character of a corpus (nanoGPT's ``shakespeare_char``).
"""

from bunmyaku.tokenization.char_tokenizer import build_char_tokenizer
from bunmyaku.tokenization.tokenizer import BatchEncoding, Tokenizer
from bunmyaku.tokenization.training import train_tokenizer

__all__ = ["BatchEncoding", "Tokenizer", "build_char_tokenizer", "train_tokenizer"]
