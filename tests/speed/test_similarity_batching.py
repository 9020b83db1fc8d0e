"""The similarity pipeline's fast batching (one tokenizer call, length-sorted unpadded batches) changes nothing."""

from __future__ import annotations

import torch

import bunmyaku
from bunmyaku.models.pooling import pool

SENTENCES = [
    "A man is eating food.",
    "x",
    "A very long sentence " + "that keeps going and going " * 40 + "until it is truncated.",
    "The girl is carrying a baby.",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates by half a point.",
    "Do you like pizza?",
    "吾輩は猫である。",
]


def test_batched_encode_equals_one_sentence_at_a_time(minilm_dir):
    pipe = bunmyaku.pipeline("sentence-similarity", model=minilm_dir, device="cpu", batch_size=3)
    batched = pipe.encode(SENTENCES)
    with torch.no_grad():
        for i, sentence in enumerate(SENTENCES):
            alone = pipe.tokenizer([sentence], truncation=True, max_length=pipe.max_length, return_tensors="pt")
            hidden = pipe.model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).last_hidden_state
            expected = pool(hidden, alone["attention_mask"], pipe.pooling, pipe.normalize)[0]
            torch.testing.assert_close(batched[i], expected, atol=1e-5, rtol=1e-5)
