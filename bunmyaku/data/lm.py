"""Pretraining examples from a token corpus: packed blocks (causal and masked LM), masking, NSP segment pairs.

Every source of randomness is a NumPy generator seeded from ``(seed, epoch, example index)``, so an example
and its mask depend neither on the batch it lands in, nor on the number of processes, nor on whether the run
was interrupted: a resumed or data-parallel run sees exactly the examples of a single uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bunmyaku.data.corpus import Split

IGNORE_INDEX = -100
Example = dict[str, Any]


def example_rng(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator for one example: a pure function of its arguments."""
    return np.random.default_rng([seed, epoch, index, stream])


class PackedBlocks:
    """Documents joined by a separator and cut into contiguous blocks of ``block_size`` ids (packing).

    For a causal LM the separator is EOS and each block is an example whose labels are its ids (the model
    shifts them). For a masked LM the separator is ``[SEP]`` and each block is wrapped as ``[CLS] ... [SEP]``
    (RoBERTa's FULL-SENTENCES inputs). With ``random_offset`` the block grid shifts by a random amount each
    epoch, so a small corpus shows the model different cuts of its text.

    Args:
        split: the corpus split.
        block_size: ids per block, ``prefix`` and ``suffix`` excluded.
        separator: the id placed after every document.
        prefix: ids put before each block (``[CLS]``).
        suffix: ids put after each block (``[SEP]``).
        random_offset: shift the grid each epoch (training); False keeps it fixed (evaluation).
        seed: seeds the per-epoch offset.
    """

    def __init__(
        self,
        split: Split,
        block_size: int,
        separator: int,
        prefix: Sequence[int] = (),
        suffix: Sequence[int] = (),
        random_offset: bool = False,
        seed: int = 0,
    ):
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.split = split
        self.block_size = block_size
        self.separator = separator
        self.prefix = np.asarray(prefix, dtype=np.int64)
        self.suffix = np.asarray(suffix, dtype=np.int64)
        self.random_offset = random_offset
        self.seed = seed
        docs = np.asarray(split.docs, dtype=np.int64)
        # document d starts at starts[d] in the virtual stream where a separator follows every document
        self.starts = docs[:-1] + np.arange(split.num_docs)
        self.stream_length = int(docs[-1]) + split.num_docs
        # one block is kept in reserve so that every offset in [0, block_size) leaves the same number of blocks
        self.num_blocks = max(0, (self.stream_length - (block_size if random_offset else 0)) // block_size)
        if self.num_blocks == 0:
            reserve = f" plus {block_size} of reserve for random offsets" if random_offset else ""
            raise ValueError(
                f"the corpus split holds {self.stream_length} ids, too few for one block of {block_size}{reserve}"
            )
        self.offset = 0

    def __len__(self) -> int:
        return self.num_blocks

    def set_epoch(self, epoch: int) -> None:
        """Choose this epoch's block grid."""
        if self.random_offset:
            self.offset = int(example_rng(self.seed, epoch, 0, stream=3).integers(self.block_size))

    def span(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Ids (and word-start flags) of the virtual stream in [start, start + length)."""
        ids, flags = [], []
        words = self.split.word_starts
        doc = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos, end = start, start + length
        while pos < end:
            within = pos - int(self.starts[doc])
            doc_len = int(self.split.docs[doc + 1] - self.split.docs[doc])
            if within < doc_len:
                take = min(doc_len - within, end - pos)
                lo = int(self.split.docs[doc]) + within
                ids.append(np.asarray(self.split.tokens[lo : lo + take], dtype=np.int64))
                if words is not None:
                    flags.append(np.asarray(words[lo : lo + take], dtype=np.uint8))
                pos += take
            else:
                ids.append(np.array([self.separator], dtype=np.int64))
                flags.append(np.ones(1, dtype=np.uint8))
                pos += 1
                doc += 1
        return np.concatenate(ids), (np.concatenate(flags) if words is not None else None)

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self.num_blocks:
            raise IndexError(index)
        ids, flags = self.span(self.offset + index * self.block_size, self.block_size)
        example: Example = {"input_ids": np.concatenate([self.prefix, ids, self.suffix])}
        if flags is not None:
            ones = np.ones
            example["word_starts"] = np.concatenate(
                [ones(len(self.prefix), np.uint8), flags, ones(len(self.suffix), np.uint8)]
            )
        return example


class SegmentPairs:
    """BERT's next-sentence-prediction inputs: ``[CLS] A [SEP] B [SEP]`` with segment ids and a label.

    Each document is cut into chunks of ``max_length - 3`` ids; example ``i`` is chunk ``i``. Its target length
    is the budget, or with probability ``short_seq_prob`` a shorter random length (BERT's trick against a
    pretrain / fine-tune length mismatch). A is a random-length prefix of the chunk; with probability 1/2, B is
    the rest of the chunk (label 0, "is next"), otherwise a span of a random other document filling the budget
    (label 1). A pair over budget loses ids from its longer segment, at the front or the back at random.

    Args:
        split: the corpus split (at least two documents).
        max_length: length of the whole input, special tokens included.
        cls_id: ``[CLS]``.
        sep_id: ``[SEP]``.
        short_seq_prob: how often the target length is drawn shorter.
        seed: seeds the draws, with the epoch and the example index.
    """

    def __init__(self, split: Split, max_length: int, cls_id: int, sep_id: int, short_seq_prob: float = 0.1, seed=0):
        if max_length < 5:
            raise ValueError(f"max_length must be at least 5 for [CLS] A [SEP] B [SEP], got {max_length}")
        if split.num_docs < 2:
            raise ValueError("next-sentence prediction needs at least two documents to draw random segments from")
        self.split = split
        self.budget = max_length - 3
        self.cls_id, self.sep_id = cls_id, sep_id
        self.short_seq_prob = short_seq_prob
        self.seed = seed
        self.epoch = 0
        docs = np.asarray(split.docs, dtype=np.int64)
        starts, doc_of = [], []
        for d in range(split.num_docs):
            chunk_starts = np.arange(docs[d], docs[d + 1], self.budget)
            starts.append(chunk_starts)
            doc_of.append(np.full(len(chunk_starts), d))
        self.chunk_starts = np.concatenate(starts)
        self.chunk_docs = np.concatenate(doc_of)

    def __len__(self) -> int:
        return len(self.chunk_starts)

    def set_epoch(self, epoch: int) -> None:
        """Draw new pairs for this epoch."""
        self.epoch = epoch

    def _slice(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray | None]:
        words = self.split.word_starts
        ids = np.asarray(self.split.tokens[lo:hi], dtype=np.int64)
        return ids, (np.asarray(words[lo:hi], dtype=np.uint8) if words is not None else None)

    def __getitem__(self, index: int) -> Example:
        rng = example_rng(self.seed, self.epoch, index, stream=1)
        doc = int(self.chunk_docs[index])
        start = int(self.chunk_starts[index])
        doc_end = int(self.split.docs[doc + 1])
        target = self.budget if rng.random() >= self.short_seq_prob else int(rng.integers(2, self.budget + 1))
        end = min(start + target, doc_end)
        a_end = start + (int(rng.integers(1, end - start)) if end - start >= 2 else end - start)
        a = self._slice(start, a_end)
        if end - a_end >= 1 and rng.random() < 0.5:
            b, label = self._slice(a_end, end), 0
        else:
            b, label = self._random_segment(rng, doc, max(1, target - (a_end - start))), 1
        a, b = _truncate_pair(a, b, self.budget, rng)
        ids = np.concatenate([[self.cls_id], a[0], [self.sep_id], b[0], [self.sep_id]]).astype(np.int64)
        segments = np.concatenate([np.zeros(len(a[0]) + 2, np.int64), np.ones(len(b[0]) + 1, np.int64)])
        example: Example = {"input_ids": ids, "token_type_ids": segments, "next_sentence_label": label}
        if a[1] is not None:
            one = np.ones(1, np.uint8)
            example["word_starts"] = np.concatenate([one, a[1], one, b[1], one])
        return example

    def _random_segment(self, rng: np.random.Generator, doc: int, length: int) -> tuple[np.ndarray, np.ndarray | None]:
        other = int(rng.integers(self.split.num_docs - 1))
        other += other >= doc  # any document but this one
        lo, hi = int(self.split.docs[other]), int(self.split.docs[other + 1])
        start = lo + int(rng.integers(max(1, hi - lo - length + 1)))
        return self._slice(start, min(start + length, hi))


def _truncate_pair(a, b, budget: int, rng: np.random.Generator):
    """BERT's ``truncate_seq_pair``: drop ids from the longer segment, at a random end, until the pair fits."""
    a_ids, a_words = a
    b_ids, b_words = b
    while len(a_ids) + len(b_ids) > budget:
        front = rng.random() < 0.5
        cut = slice(1, None) if front else slice(None, -1)
        if len(a_ids) > len(b_ids):
            a_ids, a_words = a_ids[cut], (a_words[cut] if a_words is not None else None)
        else:
            b_ids, b_words = b_ids[cut], (b_words[cut] if b_words is not None else None)
    return (a_ids, a_words), (b_ids, b_words)


class CausalLMCollator:
    """Stacks packed blocks: ``input_ids`` (B, T) and ``labels`` (B, T) equal to them (the model shifts)."""

    def __call__(self, examples: list[Example], epoch: int = 0, indices: Sequence[int] = ()) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.stack([e["input_ids"] for e in examples]))
        return {"input_ids": ids, "labels": ids.clone()}


class MaskingCollator:
    """Pads examples and masks them for masked-LM training (BERT §3.1, RoBERTa's dynamic masking).

    ``mlm_probability`` of the maskable tokens (or of the words, with ``whole_word``) are chosen; a chosen
    token becomes ``[MASK]`` 80% of the time, a random non-special token 10%, and stays unchanged 10%.
    Special tokens and padding are never chosen. ``labels`` hold the original ids at chosen positions and
    -100 elsewhere. Masks are drawn afresh each epoch (dynamic), or once per example (``static``).

    Args:
        vocab_size: the model's vocabulary size.
        mask_id: the ``[MASK]`` id.
        pad_id: the padding id.
        special_ids: ids never masked nor drawn as random replacements ([CLS], [SEP], [PAD], ...).
        mlm_probability: share of tokens (words) chosen.
        whole_word: choose whole words: a word is a token that starts one plus the pieces that follow it.
        continuation: (V,) bool, True for ids that continue a word (WordPiece ``##`` pieces); used for whole
            words when the examples carry no ``word_starts`` flags (those come from the tokenizer's word ids,
            MeCab words for a Japanese tokenizer).
        static: the same mask for an example every epoch.
        seed: seeds the draws, with the epoch and the example index.
    """

    def __init__(
        self,
        vocab_size: int,
        mask_id: int,
        pad_id: int,
        special_ids: Sequence[int],
        mlm_probability: float = 0.15,
        whole_word: bool = False,
        continuation: np.ndarray | None = None,
        static: bool = False,
        seed: int = 0,
    ):
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        self.mask_id, self.pad_id = mask_id, pad_id
        self.special = np.zeros(vocab_size, dtype=bool)
        self.special[[i for i in {*special_ids, mask_id, pad_id} if 0 <= i < vocab_size]] = True
        self.replacements = np.flatnonzero(~self.special)
        self.mlm_probability = mlm_probability
        self.whole_word = whole_word
        self.continuation = continuation
        self.static = static
        self.seed = seed

    def __call__(self, examples: list[Example], epoch: int = 0, indices: Sequence[int] = ()) -> dict[str, torch.Tensor]:
        indices = list(indices) or list(range(len(examples)))
        T = max(len(e["input_ids"]) for e in examples)
        B = len(examples)
        input_ids = np.full((B, T), self.pad_id, dtype=np.int64)
        labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        attention_mask = np.zeros((B, T), dtype=np.int64)
        token_type_ids = np.zeros((B, T), dtype=np.int64) if "token_type_ids" in examples[0] else None
        for row, (example, index) in enumerate(zip(examples, indices, strict=True)):
            ids = np.asarray(example["input_ids"], dtype=np.int64)
            n = len(ids)
            rng = example_rng(self.seed, 0 if self.static else epoch, index, stream=2)
            masked, target = self.mask(ids, example.get("word_starts"), rng)
            input_ids[row, :n] = masked
            labels[row, :n] = target
            attention_mask[row, :n] = 1
            if token_type_ids is not None:
                token_type_ids[row, :n] = example["token_type_ids"]
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
        }
        if token_type_ids is not None:
            batch["token_type_ids"] = torch.from_numpy(token_type_ids)
        if "next_sentence_label" in examples[0]:
            batch["next_sentence_label"] = torch.tensor([e["next_sentence_label"] for e in examples])
        return batch

    def mask(
        self, ids: np.ndarray, word_starts: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mask one sequence: returns (masked ids, labels with -100 where not chosen)."""
        maskable = ~self.special[ids]
        if self.whole_word:
            if word_starts is not None:
                starts = np.asarray(word_starts, dtype=bool) | ~maskable
            elif self.continuation is not None:
                starts = ~self.continuation[ids] | ~maskable
            else:
                raise ValueError("whole_word masking needs word-start flags in the corpus or a continuation table")
            # a special token is a word of its own, and so is a piece right after one (a block cut inside a word)
            starts[1:] |= ~maskable[:-1]
            word = np.cumsum(starts) - 1  # the word each token belongs to
            chosen_words = rng.random(int(word[-1]) + 1 if len(word) else 0) < self.mlm_probability
            chosen = chosen_words[word] & maskable
        else:
            chosen = (rng.random(len(ids)) < self.mlm_probability) & maskable
        labels = np.where(chosen, ids, IGNORE_INDEX)
        action = rng.random(len(ids))
        masked = ids.copy()
        masked[chosen & (action < 0.8)] = self.mask_id
        randomised = chosen & (action >= 0.8) & (action < 0.9)
        masked[randomised] = rng.choice(self.replacements, size=int(randomised.sum()))
        return masked, labels


def wordpiece_continuation(vocab: dict[str, int], vocab_size: int, prefix: str = "##") -> np.ndarray:
    """(V,) bool: True for the ids of WordPiece pieces that continue a word (``##ing``)."""
    table = np.zeros(vocab_size, dtype=bool)
    for token, index in vocab.items():
        if token.startswith(prefix) and len(token) > len(prefix) and index < vocab_size:
            table[index] = True
    return table
