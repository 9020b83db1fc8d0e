"""BigBird parity with ``transformers`` (full attention): every head we have, padded batches, both directions."""

from __future__ import annotations

import pytest
import torch

import bunmyaku
from tests.conftest import require_module
from tests.parity.helpers import assert_close, randomize, right_padded_batch, save

transformers = require_module("transformers")

CONFIGS = [
    dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
    dict(
        vocab_size=101,
        hidden_size=36,
        num_hidden_layers=3,
        num_attention_heads=3,
        intermediate_size=50,
        hidden_act="relu",
        use_bias=False,
        rescale_embeddings=True,
        layer_norm_eps=1e-7,
    ),
]
# block_sparse with tiny blocks: transformers attends fully up to (5 + 2 * 1) * 2 = 14 tokens, so do we
MODES = [dict(attention_type="original_full"), dict(attention_type="block_sparse", block_size=2, num_random_blocks=1)]

HEADS = {
    "base": ("Model", ["last_hidden_state", "pooler_output"], {}),
    "masked-lm": ("ForMaskedLM", ["logits"], {}),
    "sequence-classification": ("ForSequenceClassification", ["logits"], {"num_labels": 3}),
    "token-classification": ("ForTokenClassification", ["logits"], {"num_labels": 5}),
}


def _hf_config(index, mode, **extra):
    return transformers.BigBirdConfig(**CONFIGS[index], **MODES[mode], max_position_embeddings=32, **extra)


@pytest.mark.parametrize("task", list(HEADS))
@pytest.mark.parametrize("index, mode", [(0, 0), (1, 1)])
def test_big_bird_parity_both_directions(tmp_path, task, index, mode):
    suffix, fields, extra = HEADS[task]
    hf_class = getattr(transformers, "BigBird" + suffix)
    hf_model = randomize(hf_class(_hf_config(index, mode, **extra)), seed=index)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    assert type(model).__name__ == "BigBird" + suffix
    ids, mask = right_padded_batch(CONFIGS[index]["vocab_size"], length=11, seed=index)
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    with torch.no_grad():
        expected = hf_model(**inputs)
        reloaded = hf_class.from_pretrained(save(model, tmp_path / "ours")).eval()
        for out in (model(**inputs), reloaded(**inputs)):
            for field in fields:
                value = out[field]
                per_token = value.dim() >= 2 and value.shape[:2] == mask.shape
                assert_close(value, expected[field], mask if per_token else None)  # real positions only


def test_big_bird_losses_match(tmp_path):
    ids, mask = right_padded_batch(99, length=11, seed=3)
    cases = [
        ("ForMaskedLM", {}, {"labels": ids.masked_fill(mask == 0, -100)}),
        ("ForSequenceClassification", {"num_labels": 3}, {"labels": torch.tensor([0, 2, 1])}),
        ("ForTokenClassification", {"num_labels": 5}, {"labels": (ids % 5).masked_fill(mask == 0, -100)}),
    ]
    for suffix, extra, labels in cases:
        hf_model = randomize(getattr(transformers, "BigBird" + suffix)(_hf_config(0, 0, **extra)), seed=4)
        model = bunmyaku.from_pretrained(save(hf_model, tmp_path / suffix))
        inputs = dict(input_ids=ids, attention_mask=mask, **labels)
        with torch.no_grad():
            assert_close(model(**inputs).loss, hf_model(**inputs).loss)


# block_sparse past the full-attention limit: (block_size, num_random_blocks, length); lengths no block multiple
SPARSE = [(2, 1, 31), (4, 2, 61), (3, 3, 40)]


@pytest.mark.parametrize("task", ["base", "masked-lm", "sequence-classification"])
@pytest.mark.parametrize("case", range(len(SPARSE)))
def test_block_sparse_matches_transformers_in_eval_mode(tmp_path, task, case):
    block_size, num_random, length = SPARSE[case]
    suffix, fields, extra = HEADS[task]
    index = case % 2
    config = transformers.BigBirdConfig(
        **CONFIGS[index],
        attention_type="block_sparse",
        block_size=block_size,
        num_random_blocks=num_random,
        max_position_embeddings=64,
        **extra,
    )
    hf_class = getattr(transformers, "BigBird" + suffix)
    hf_model = randomize(hf_class(config), seed=case)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    ids, mask = right_padded_batch(CONFIGS[index]["vocab_size"], length=length, seed=case)
    mask[1, length - 9 :] = 0  # one row padded by more than a block
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask)
        ours = model(input_ids=ids, attention_mask=mask)
    # transformers switches a model to full attention for good after one short input; this one stayed sparse
    assert getattr(hf_model, "bert", hf_model).attention_type == "block_sparse"
    for field in fields:
        value = ours[field]
        per_token = value.dim() >= 2 and value.shape[:2] == mask.shape
        assert_close(value, expected[field], mask if per_token else None)  # real positions only


def test_block_sparse_is_not_dense_attention(tmp_path):
    """The block-sparse outputs differ from full attention's on the same weights: the pattern is really sparse."""
    config = transformers.BigBirdConfig(**CONFIGS[0], attention_type="block_sparse", block_size=2, num_random_blocks=1)
    hf_model = randomize(transformers.BigBirdModel(config), seed=5)
    sparse = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    dense = bunmyaku.from_pretrained(tmp_path / "hf", attention_type="original_full")
    ids, _ = right_padded_batch(99, length=31, seed=5)
    with torch.no_grad():
        diff = (sparse(input_ids=ids).last_hidden_state - dense(input_ids=ids).last_hidden_state).abs().max()
    assert diff > 1e-2


def test_block_sparse_refuses_eager_attention(tmp_path):
    hf_model = transformers.BigBirdModel(_hf_config(0, 1))
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"), attn_implementation="eager")
    model(input_ids=torch.ones(1, 14, dtype=torch.long))  # up to the limit: full attention, as in transformers
    with pytest.raises(ValueError, match="15 tokens with attention_type='block_sparse'.*SDPA only"):
        model(input_ids=torch.ones(1, 15, dtype=torch.long))
