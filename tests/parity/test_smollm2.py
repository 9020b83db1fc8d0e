"""SmolLM2-135M-Instruct from its GGUF file (Q4_1, dequantized to float32): bunmyaku against ``transformers``.

Both sides read the same file: bunmyaku through ``bunmyaku.from_pretrained(path.gguf)``, transformers through
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``, whose tokenizer gives the ids for both.
"""

from __future__ import annotations

import pytest
import torch

import bunmyaku
from bunmyaku.models.generation import generate
from tests.conftest import require_module
from tests.parity.helpers import assert_close

transformers = require_module("transformers")
require_module("gguf")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4,",
    "The best way to learn a new language is",
]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # older transformers leave the GGUF's padding id unset
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def model(smollm2_gguf):
    return bunmyaku.from_pretrained(smollm2_gguf)


@pytest.fixture(scope="module")
def batch(hf_tokenizer):
    """The prompts, left-padded into one batch: ids and attention mask (B, T)."""
    encoded = hf_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return encoded["input_ids"], encoded["attention_mask"]


def test_smollm2_config_from_gguf(model, hf_model):
    config = model.config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert config.tie_word_embeddings and hf_model.config.tie_word_embeddings
    assert config.rope_theta == hf_model.config.rope_parameters["rope_theta"] == 100000.0
    assert model.head.lm_head.weight is model.backbone.embed.weight


def test_smollm2_next_token_logits_match(model, hf_model, batch):
    ids, mask = batch
    assert (mask == 0).any(), "the batch should hold left padding"
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        theirs = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    assert_close(ours, theirs, atol=1e-4)


def test_smollm2_greedy_generation_matches(model, hf_model, hf_tokenizer, batch):
    ids, mask = batch
    stop = dict(eos_token_id=hf_tokenizer.eos_token_id, pad_token_id=hf_tokenizer.pad_token_id)
    ours = generate(model, ids, mask, max_new_tokens=32, **stop)
    theirs = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False, **stop)
    assert ours.shape == theirs.shape == (len(PROMPTS), ids.size(1) + 32)
    assert torch.equal(ours, theirs), hf_tokenizer.batch_decode(ours[:, ids.size(1) :])
    assert "Paris" in hf_tokenizer.decode(ours[0, ids.size(1) :])
