"""Whole-word masking for Japanese: word starts come from the tokenizer's word ids (MeCab words)."""

from __future__ import annotations

import numpy as np

from bunmyaku.data import MaskingCollator, PackedBlocks, build_corpus
from tests.conftest import require_module

TEXT = (
    "吾輩は猫である。名前はまだ無い。\n"
    "どこで生れたかとんと見当がつかぬ。\n"
    "何でも薄暗いじめじめした所で泣いていた事だけは記憶している。\n"
)


def test_corpus_word_starts_follow_mecab_words_and_whole_words_are_masked(tmp_path):
    require_module("fugashi")
    from bunmyaku import train_tokenizer

    src = tmp_path / "ja.txt"
    src.write_text(TEXT * 20, encoding="utf-8")
    tokenizer = train_tokenizer([src], kind="wordpiece", vocab_size=70, pre_tokenizer="mecab", min_frequency=1)
    corpus = build_corpus([src], tokenizer, tmp_path / "c", doc_split="line", valid_fraction=0.0, word_starts=True)
    train = corpus.split("train")
    first = tokenizer.backend.encode(TEXT.splitlines()[0], add_special_tokens=False)
    flags = [1] + [int(a != b) for a, b in zip(first.word_ids, first.word_ids[1:], strict=False)]
    assert train.word_starts[: len(flags)].tolist() == flags
    assert 0 in flags  # some MeCab word spans several pieces

    specials = tokenizer.all_special_ids
    blocks = PackedBlocks(train, 30, tokenizer.sep_token_id, prefix=[tokenizer.cls_token_id], suffix=[specials[0]])
    collator = MaskingCollator(
        len(tokenizer), tokenizer.mask_token_id, tokenizer.pad_token_id, specials, mlm_probability=0.3, whole_word=True
    )
    examples = [blocks[i] for i in range(len(blocks))]
    labels = collator(examples, indices=range(len(examples)))["labels"].numpy()
    for row, example in enumerate(examples):
        chosen = labels[row] != -100
        maskable = ~np.isin(example["input_ids"], specials)
        starts = example["word_starts"].astype(bool) | ~maskable
        starts[1:] |= ~maskable[:-1]  # a block may start inside a word: its first pieces form a word
        word = np.cumsum(starts)
        for w in np.unique(word[chosen]):
            assert chosen[word == w].all()
