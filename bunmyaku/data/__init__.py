"""Data: raw text to memory-mapped token corpora, pretraining examples (packing, masking, NSP), batch streams."""

from bunmyaku.data.corpus import Split, TokenCorpus, build_corpus, read_documents, token_dtype
from bunmyaku.data.lm import (
    CausalLMCollator,
    MaskingCollator,
    PackedBlocks,
    SegmentPairs,
    wordpiece_continuation,
)
from bunmyaku.data.loader import BatchStream, eval_batches

__all__ = [
    "BatchStream",
    "CausalLMCollator",
    "MaskingCollator",
    "PackedBlocks",
    "SegmentPairs",
    "Split",
    "TokenCorpus",
    "build_corpus",
    "eval_batches",
    "read_documents",
    "token_dtype",
    "wordpiece_continuation",
]
