"""``output_attentions=True`` against ``transformers``' eager attention weights, on padded batches."""

from __future__ import annotations

import pytest
import torch

import bunmyaku
from tests.conftest import require_module
from tests.parity.helpers import assert_close, randomize, right_padded_batch, save

transformers = require_module("transformers")

ENCODER = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
# (HF config class, HF model class, config fields, padding side)
MODELS = {
    "bert": ("BertConfig", "BertForSequenceClassification", ENCODER, "right"),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", dict(ENCODER, pad_token_id=1), "right"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4), "left"),
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(ENCODER, num_key_value_heads=2, num_hidden_layers=3, pad_token_id=0),  # grouped-query attention
        "left",
    ),
}


@pytest.mark.parametrize("name", MODELS)
def test_attention_weights_match_transformers_eager(tmp_path, name):
    config_class, model_class, fields, side = MODELS[name]
    config = getattr(transformers, config_class)(**fields, attn_implementation="eager")
    hf_model = randomize(getattr(transformers, model_class)(config), seed=3)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    ids, mask = right_padded_batch(fields["vocab_size"], seed=1)
    if side == "left":
        mask = mask.flip(-1)
    theirs = dict(input_ids=ids, attention_mask=mask)
    if side == "left":  # HF's decoders take positions from the caller; ours count them from the mask
        theirs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf_model(**theirs, output_attentions=True)
        actual = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    layers = config.num_hidden_layers
    assert len(actual.attentions) == len(expected.attentions) == layers
    B, T = ids.shape
    for ours, hf in zip(actual.attentions, expected.attentions, strict=True):
        assert ours.shape == (B, config.num_attention_heads, T, T)
        # the rows of real query positions; a padding query's row is arbitrary in both libraries
        assert_close(ours.transpose(1, 2), hf.transpose(1, 2), mask)
        torch.testing.assert_close(ours.sum(-1), torch.ones(B, config.num_attention_heads, T))
    # the same logits as the fused path: recording changes what is returned, not the result
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask)
    assert plain.attentions is None
    assert_close(actual.logits, plain.logits, mask if plain.logits.dim() == 3 else None)


def test_attentions_sit_where_transformers_puts_them(tmp_path):
    """Positional access: (loss, logits, hidden_states, attentions), as HF's sequence classifier returns them."""
    config = transformers.BertConfig(**ENCODER, num_labels=3, attn_implementation="eager")
    hf_model = randomize(transformers.BertForSequenceClassification(config), seed=5)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    ids, mask = right_padded_batch(99, seed=2)
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1]))
    with torch.no_grad():
        theirs = hf_model(**kwargs, output_attentions=True, output_hidden_states=True)
        ours = model(**kwargs, output_attentions=True, output_hidden_states=True)
    assert list(ours.keys()) == list(theirs.keys()) == ["loss", "logits", "hidden_states", "attentions"]
    assert len(ours.to_tuple()) == len(theirs.to_tuple()) == 4
    assert_close(ours[0], theirs[0])
    assert_close(ours[1], theirs[1])
    assert_close(ours[-1][1], theirs[-1][1])
    assert [t.shape for t in ours[2:][0]] == [t.shape for t in theirs[2:][0]]
    without_labels = model(input_ids=ids, attention_mask=mask)
    assert_close(without_labels[0], theirs.logits)  # no loss: the logits come first, as in HF


def test_encoder_decoder_attentions_match_transformers(tmp_path):
    """Marian: encoder, decoder and cross-attention weights, in HF's fields and positions, a padded source."""
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    config = transformers.MarianConfig(
        vocab_size=50, d_model=24, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=6, encoder_ffn_dim=8, decoder_ffn_dim=8, pad_token_id=49, decoder_start_token_id=49,
        max_position_embeddings=32, attn_implementation="eager",
    )  # fmt: skip
    hf_model = randomize(transformers.MarianMTModel(config), seed=4)
    with torch.no_grad():
        for module in hf_model.modules():
            if isinstance(module, MarianSinusoidalPositionalEmbedding):
                module.weight.copy_(module.create_weight())
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    ids, mask = right_padded_batch(49, seed=6)
    target = torch.randint(3, 49, (3, 5), generator=torch.Generator().manual_seed(7))
    kwargs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=target, output_attentions=True)
    with torch.no_grad():
        theirs, ours = hf_model(**kwargs), model(**kwargs)
    fields = ["decoder_attentions", "cross_attentions", "encoder_attentions"]
    assert [k for k in ours.keys() if k in fields] == [k for k in theirs.keys() if k in fields] == fields
    shapes = {"encoder_attentions": (2, 4, 9, 9), "decoder_attentions": (3, 6, 5, 5), "cross_attentions": (3, 6, 5, 9)}
    for field, (layers, *shape) in shapes.items():
        mine, hf = getattr(ours, field), getattr(theirs, field)
        assert len(mine) == len(hf) == layers
        for a, b in zip(mine, hf, strict=True):
            assert a.shape == (3, *shape)
            if field == "encoder_attentions":  # the rows of real source queries only
                assert_close(a.transpose(1, 2), b.transpose(1, 2), mask)
            else:
                assert_close(a, b)
    assert ours.attentions is None
