"""Real weights: all-MiniLM-L6-v2 sentence embeddings equal those computed with ``transformers``."""

from __future__ import annotations

import pytest
import torch

import bunmyaku
from bunmyaku.models.bi_encoder import BiEncoder
from bunmyaku.models.pooling import pool
from tests.conftest import require_module
from tests.parity.helpers import assert_close

transformers = require_module("transformers")

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome!",
    "The cat sits outside.",
    "Do you like pizza?",
    "Attention is all you need.",
    "BERT pre-trains deep bidirectional representations from unlabeled text.",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates by half a point.",
    "吾輩は猫である。名前はまだ無い。",
    "Ich bin ein Berliner.",
    "Café crème brûlée, naïve façade, résumé.",
    "😀 emoji and symbols: ∑ ∫ √ → ≠",
    "x",
    "   leading and trailing spaces   ",
    "A very long sentence " + "that keeps going and going " * 60 + "until it is truncated.",
]


@pytest.fixture(scope="module")
def hf_and_ours(minilm_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    hf_model = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    ours = bunmyaku.from_pretrained(minilm_dir)
    return tokenizer, hf_model, ours


def sentence_transformers_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling, written out: the masked sum of the token states / the count of real
    tokens, (B, T, C) -> (B, C). all-MiniLM-L6-v2 then L2-normalises it."""
    mask = attention_mask.unsqueeze(-1).float()  # (B, T, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def test_minilm_embeddings_match_transformers(hf_and_ours):
    tokenizer, hf_model, ours = hf_and_ours
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    # the batch exercises what the pooling must get right: padded rows, and a row cut at max_length
    mask = batch["attention_mask"]
    assert mask.shape[1] == 256 and mask[:, -1].sum() == 1 and (mask.sum(1) < 10).any()
    with torch.no_grad():
        hidden, theirs = ours(**batch).last_hidden_state, hf_model(**batch).last_hidden_state
        expected_mean = sentence_transformers_mean(theirs, mask)
        expected = expected_mean / expected_mean.norm(dim=-1, keepdim=True)
        actual = BiEncoder(ours, pooling="mean").embed(batch["input_ids"], mask)
        # the token states too, on real positions, and the mean before normalisation
        assert_close(hidden, theirs, mask)
        assert_close(pool(hidden, mask, "mean"), expected_mean)
    assert_close(actual, expected)
    # and the embeddings carry meaning: the paraphrase pair is closer than an unrelated one
    assert actual[0] @ actual[1] > actual[0] @ actual[4] + 0.3


def test_minilm_round_trip_through_bunmyaku(hf_and_ours, tmp_path):
    tokenizer, hf_model, ours = hf_and_ours
    ours.save_pretrained(tmp_path)
    reloaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    batch = tokenizer(SENTENCES[:5], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert_close(reloaded(**batch).last_hidden_state, hf_model(**batch).last_hidden_state, batch["attention_mask"])
