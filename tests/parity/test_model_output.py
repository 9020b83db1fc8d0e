"""``ModelOutput`` read as HF's outputs are: by position in HF's field order, by slice, ``to_tuple()``, by key."""

from __future__ import annotations

import pytest
import torch

import bunmyaku
from bunmyaku.models.base import ModelOutput
from tests.conftest import require_module
from tests.parity.helpers import assert_close, randomize, save

transformers = require_module("transformers")

BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
GPT2 = dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4)
LLAMA = dict(BERT, num_key_value_heads=2)
IDS = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])

# (HF config, HF class, config fields, extra inputs)
CASES = {
    "bert-base": ("BertConfig", "BertModel", BERT, dict(output_hidden_states=True)),
    "bert-qa": ("BertConfig", "BertForQuestionAnswering", BERT,
                dict(start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 3]))),
    "bert-pretraining": ("BertConfig", "BertForPreTraining", BERT, dict(output_hidden_states=True)),
    "bert-classifier": ("BertConfig", "BertForSequenceClassification", BERT, {}),
    "gpt2-lm": ("GPT2Config", "GPT2LMHeadModel", GPT2, dict(labels=IDS, use_cache=True, output_hidden_states=True)),
    "gpt2-base": ("GPT2Config", "GPT2Model", GPT2, dict(use_cache=True)),
    "llama-lm": ("LlamaConfig", "LlamaForCausalLM", LLAMA, dict(use_cache=True, output_attentions=True)),
}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_positions_follow_transformers_field_order(tmp_path, name):
    config_class, model_class, fields, extra = CASES[name]
    config = getattr(transformers, config_class)(**fields, attn_implementation="eager")
    hf_model = randomize(getattr(transformers, model_class)(config), seed=1)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    with torch.no_grad():
        theirs = hf_model(input_ids=IDS, **extra)
        ours = model(input_ids=IDS, **extra)
    # transformers 5.2x names the KV cache ``cache`` (``past_key_values`` still reads it); its position is the same
    assert list(ours.keys()) == [{"cache": "past_key_values"}.get(k, k) for k in theirs.keys()]
    assert len(ours.to_tuple()) == len(theirs.to_tuple()) == len(ours)
    for i, (mine, hf) in enumerate(zip(ours.to_tuple(), theirs.to_tuple(), strict=True)):
        assert ours[i] is mine
        if isinstance(hf, torch.Tensor):
            assert_close(mine, hf, atol=1e-4)
        elif isinstance(hf, tuple):  # hidden states or attentions, one per layer
            assert len(mine) == len(hf)
            for a, b in zip(mine, hf, strict=True):
                assert_close(a, b, atol=1e-4)
    assert ours[1:] == ours.to_tuple()[1:] and isinstance(ours[:2], tuple)
    first = ours.keys()[0]
    assert ours[first] is getattr(ours, first) is ours[0]


def test_an_output_iterates_and_converts_like_a_dict():
    logits, loss = torch.zeros(2, 3), torch.tensor(1.0)
    out = ModelOutput(logits=logits, loss=loss)
    assert list(out) == ["loss", "logits"]  # iterating yields the names of the fields that hold a value, as in HF
    assert dict(out) == {"loss": loss, "logits": logits}
    assert out.to_tuple() == (loss, logits) and out[-1] is logits
    assert out["hidden_states"] is None  # an unset field by name: None, as attribute access gives
    with pytest.raises(IndexError):
        out[2]
