"""Masking: BERT's 15% / 80-10-10 statistics, specials and padding never chosen, whole words, static vs dynamic."""

from __future__ import annotations

import numpy as np
import pytest

from bunmyaku.data import MaskingCollator, wordpiece_continuation

V, CLS, SEP, PAD, MASK = 1000, 1, 2, 0, 3
SPECIALS = [PAD, CLS, SEP, MASK]


def _examples(n: int, length: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": np.concatenate([[CLS], rng.integers(10, V, length - 2), [SEP]])} for _ in range(n)]


def _collator(**kwargs) -> MaskingCollator:
    return MaskingCollator(vocab_size=V, mask_id=MASK, pad_id=PAD, special_ids=SPECIALS, **kwargs)


def test_masking_statistics_over_100k_tokens():
    examples = _examples(800, 128)
    batch = _collator()(examples, epoch=0, indices=range(len(examples)))
    original = np.stack([e["input_ids"] for e in examples])
    labels, inputs = batch["labels"].numpy(), batch["input_ids"].numpy()
    maskable = ~np.isin(original, SPECIALS)
    chosen = labels != -100
    assert maskable.sum() > 100_000
    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.01
    assert (labels[chosen] == original[chosen]).all()
    as_mask = (inputs[chosen] == MASK).mean()
    unchanged = (inputs[chosen] == original[chosen]).mean()
    randomised = 1 - as_mask - unchanged
    assert abs(as_mask - 0.8) < 0.01
    # a random replacement may draw the original id (1 / V of the time), which then counts as unchanged
    assert abs(unchanged - 0.1) < 0.01
    assert abs(randomised - 0.1) < 0.01
    assert (inputs[~chosen] == original[~chosen]).all()


def test_special_tokens_and_padding_never_masked():
    examples = _examples(64, 40) + _examples(64, 12, seed=1)  # unequal lengths: the short ones get padded
    batch = _collator(mlm_probability=0.9)(examples, epoch=3, indices=range(len(examples)))
    inputs, labels, attention = batch["input_ids"].numpy(), batch["labels"].numpy(), batch["attention_mask"].numpy()
    assert (labels[attention == 0] == -100).all() and (inputs[attention == 0] == PAD).all()
    assert (labels[:, 0] == -100).all()  # [CLS]
    lengths = attention.sum(1)
    assert all(labels[i, lengths[i] - 1] == -100 for i in range(len(lengths)))  # [SEP]
    assert not np.isin(inputs[labels != -100], [CLS, SEP, PAD]).any()  # no special drawn as a replacement


def test_whole_word_masking_masks_whole_words_from_wordpiece_pieces():
    vocab = {"[PAD]": PAD, "[CLS]": CLS, "[SEP]": SEP, "[MASK]": MASK}
    vocab.update({f"w{i}": i for i in range(10, 500)})
    vocab.update({f"##p{i}": i for i in range(500, V)})
    continuation = wordpiece_continuation(vocab, V)
    rng = np.random.default_rng(0)
    ids = [CLS]
    for _ in range(3000):  # words of 1-4 pieces
        ids += [int(rng.integers(10, 500))] + [int(x) for x in rng.integers(500, V, rng.integers(0, 4))]
    ids.append(SEP)
    example = {"input_ids": np.array(ids)}
    collator = _collator(whole_word=True, continuation=continuation)
    labels = collator([example], epoch=0, indices=[0])["labels"].numpy()[0]
    chosen = labels != -100
    starts = ~continuation[np.array(ids)]
    word = np.cumsum(starts)
    for w in np.unique(word[chosen]):
        assert chosen[word == w].all(), "a word was masked only in part"
    assert 0.12 < chosen.mean() < 0.18


def test_whole_word_masking_from_word_start_flags():
    rng = np.random.default_rng(1)
    flags = (rng.random(2000) < 0.4).astype(np.uint8)
    flags[0] = 1
    example = {"input_ids": rng.integers(10, V, 2000), "word_starts": flags}
    labels = _collator(whole_word=True)([example], epoch=0, indices=[0])["labels"].numpy()[0]
    chosen = labels != -100
    word = np.cumsum(flags)
    assert chosen.any()
    for w in np.unique(word[chosen]):
        assert chosen[word == w].all()


def test_dynamic_masks_change_with_the_epoch_static_ones_do_not():
    examples = _examples(4, 64)
    dynamic, static = _collator(), _collator(static=True)
    d0, d1 = (dynamic(examples, epoch=e, indices=range(4))["labels"] for e in (0, 1))
    s0, s1 = (static(examples, epoch=e, indices=range(4))["labels"] for e in (0, 1))
    assert not (d0 == d1).all()
    assert (s0 == s1).all()
    again = dynamic(examples, epoch=0, indices=range(4))["labels"]
    assert (again == d0).all()  # a pure function of (seed, epoch, index): exact resume


def test_bad_probability_rejected():
    with pytest.raises(ValueError, match="mlm_probability"):
        _collator(mlm_probability=0.0)
