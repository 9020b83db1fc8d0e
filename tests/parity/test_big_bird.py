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


def test_block_sparse_beyond_full_attention_is_refused(tmp_path):
    hf_model = transformers.BigBirdModel(_hf_config(0, 1))
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    model(input_ids=torch.ones(1, 14, dtype=torch.long))  # up to the limit: full attention, as in transformers
    with pytest.raises(ValueError, match="15 tokens with attention_type='block_sparse'.*up to 14 tokens"):
        model(input_ids=torch.ones(1, 15, dtype=torch.long))
