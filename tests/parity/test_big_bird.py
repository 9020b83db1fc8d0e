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


@pytest.mark.parametrize("route", ["blocked", "flex"])
@pytest.mark.parametrize("task", ["base", "masked-lm", "sequence-classification"])
@pytest.mark.parametrize("case", range(len(SPARSE)))
def test_block_sparse_matches_transformers_in_eval_mode(tmp_path, request, route, task, case):
    """route "blocked": the CPU path; "flex": the model's CUDA route (FlexAttention, a BlockMask of the listed
    blocks), run eagerly on the CPU."""
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
    flex_calls = request.getfixturevalue("flex_on_cpu") if route == "flex" else []
    ids, mask = right_padded_batch(CONFIGS[index]["vocab_size"], length=length, seed=case)
    mask[1, length - 9 :] = 0  # one row padded by more than a block
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask)
        ours = model(input_ids=ids, attention_mask=mask)
    # transformers switches a model to full attention for good after one short input; this one stayed sparse
    assert getattr(hf_model, "bert", hf_model).attention_type == "block_sparse"
    assert flex_calls == (["sparse"] * config.num_hidden_layers if route == "flex" else [])
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


def _transformers_draws(length, block_size, num_random, max_positions, draws, heads=4):
    """The random blocks ``transformers`` draws in training, (draws, H, n - 2, r), read from its own code path: one
    layer whose seed (which it gives numpy's global generator on each training forward) is varied per forward."""
    import numpy as np

    config = transformers.BigBirdConfig(
        **{**CONFIGS[0], "num_hidden_layers": 1}, attention_type="block_sparse", block_size=block_size,
        num_random_blocks=num_random, max_position_embeddings=max_positions, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = transformers.BigBirdModel(config).train()
    attention = model.encoder.layer[0].attention.self
    seen = []
    make_mask = attention._create_rand_mask_from_inputs

    def record(from_blocked, to_blocked, rand_attn, *args):
        seen.append(rand_attn[0].clone())  # (H, n - 2, r): the same for every row of the batch
        return make_mask(from_blocked, to_blocked, rand_attn, *args)

    attention._create_rand_mask_from_inputs = record
    state = np.random.get_state()
    try:
        with torch.no_grad():
            for seed in range(draws):
                attention.seed = seed
                model(input_ids=torch.ones(1, length, dtype=torch.long))
    finally:
        np.random.set_state(state)
    return torch.stack(seen)


# length, block size, random blocks, max positions: the plan transformers follows past 2r + 5 blocks (the second
# case padded up to a block multiple), then its older rule at 1024 tokens (all of it, then half of max positions)
RANDOM_RULES = [(80, 4, 2, 128), (61, 4, 1, 64), (1024, 16, 2, 1024), (1024, 32, 1, 2048)]


@pytest.mark.parametrize("length, block_size, num_random, max_positions", RANDOM_RULES)
def test_training_random_blocks_obey_transformers_rule(length, block_size, num_random, max_positions):
    """Every block we draw is one ``transformers`` draws for that query block (never its window, block 0 ...), no
    row lists a block twice, and every block it draws we draw too, over many draws."""
    from bunmyaku.models.sparse_attention import BlockSparsePattern

    theirs = _transformers_draws(length, block_size, num_random, max_positions, draws=120)  # (draws, H, n - 2, r)
    torch.manual_seed(0)
    ours = torch.stack(
        [
            BlockSparsePattern.eval_mode(block_size, num_random, length).redrawn(4, max_positions).random_blocks
            for _ in range(120)
        ]
    )
    assert ours.shape == theirs.shape
    n = theirs.size(2) + 2
    for draws in (theirs, ours):
        rows = draws.flatten(0, 1).sort(-1).values  # (draws H, n - 2, r)
        assert (rows[..., 1:] != rows[..., :-1]).all()  # r distinct blocks in each row

    def allowed(draws):
        blocks = torch.zeros(n - 2, n, dtype=torch.bool)
        blocks.scatter_(1, draws.permute(2, 0, 1, 3).reshape(n - 2, -1).long(), True)
        return blocks

    expected = allowed(theirs)
    torch.testing.assert_close(allowed(ours), expected, atol=0, rtol=0)
    assert not expected[:, 0].any()  # never block 0
    assert (expected.sum(-1) > num_random).all()  # each row had a choice: the comparison means something
    assert not any(expected[i - 1, i - 1 : i + 2].any() for i in range(2, n - 4))  # a window is never drawn there
    assert not torch.equal(ours[0, 0], ours[0, 1])  # the heads draw apart
