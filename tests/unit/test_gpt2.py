"""GPT-2 unit tests on tiny random models: shapes, causality, KV cache, padding, checkpoints, gradients."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import bunmyaku
from bunmyaku.hub import CheckpointError
from bunmyaku.models.attention import KVCache
from bunmyaku.models.gpt2 import (
    TASKS,
    GPT2Config,
    GPT2DoubleHeadsModel,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    GPT2PreTrainedModel,
)

PAD = 0
TINY = dict(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=32, pad_token_id=PAD)


def tiny_config(**overrides) -> GPT2Config:
    fields = dict(TINY, dropout=0.0, embd_dropout=0.0, attention_dropout=0.0, summary_first_dropout=0.0)
    return GPT2Config(**{**fields, **overrides})


def tiny(cls=GPT2LMHeadModel, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return cls.from_config(tiny_config(**overrides)).eval()


def ids(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def test_every_head_has_the_right_shapes():
    x = ids(2, 7)
    B, T, C, V = 2, 7, 32, 99
    base = tiny(GPT2Model)(input_ids=x, output_hidden_states=True)
    assert base.last_hidden_state.shape == (B, T, C) and len(base.hidden_states) == 3
    assert tiny(GPT2LMHeadModel)(input_ids=x).logits.shape == (B, T, V)
    assert tiny(TASKS["sequence-classification"], id2label={0: "a", 1: "b", 2: "c"})(input_ids=x).logits.shape == (B, 3)
    assert tiny(TASKS["token-classification"])(input_ids=x).logits.shape == (B, T, 2)
    qa = tiny(TASKS["question-answering"])(input_ids=x)
    assert qa.start_logits.shape == qa.end_logits.shape == (B, T)
    choices = tiny(GPT2DoubleHeadsModel)(input_ids=ids(6, 7).view(2, 3, 7), mc_token_ids=torch.full((2, 3), 6))
    assert choices.logits.shape == (2, 3, T, V) and choices.mc_logits.shape == (2, 3)
    assert set(TASKS) == {
        "base",
        "causal-lm",
        "sequence-classification",
        "token-classification",
        "question-answering",
        "pair-classification",
    }


def test_no_causal_leakage():
    model = tiny()
    x = ids(1, 8)
    changed = x.clone()
    changed[0, 5] = (x[0, 5] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        a, b = model(input_ids=x).logits, model(input_ids=changed).logits
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_padding_positions_do_not_see_real_tokens():
    """The last left-padding position's logits are scored (they predict the first real token): no peeking."""
    model = tiny()
    x, mask = ids(1, 8), torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    changed = x.clone()
    changed[0, 3:] = (x[0, 3:] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        a, b = model(input_ids=x, attention_mask=mask).logits, model(input_ids=changed, attention_mask=mask).logits
    torch.testing.assert_close(a[:, :3], b[:, :3])


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_kv_cache_decoding_equals_full_forward(attn_implementation):
    model = tiny(attn_implementation=attn_implementation)
    x = ids(3, 9, seed=1)
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padding
    mask[2, :5] = 0
    with torch.no_grad():
        full = model(input_ids=x, attention_mask=mask).logits
        out = model(input_ids=x[:, :4], attention_mask=mask[:, :4], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        assert isinstance(cache, KVCache) and len(cache) == 4
        for t in range(4, 9):
            out = model(input_ids=x[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache)
            steps.append(out.logits)
        assert out.past_key_values is cache and len(cache) == 9
    torch.testing.assert_close(torch.cat(steps, dim=1)[mask.bool()], full[mask.bool()], atol=1e-5, rtol=1e-5)


def test_kv_cache_without_mask():
    model = tiny(GPT2Model)
    x = ids(2, 6)
    with torch.no_grad():
        full = model(input_ids=x).last_hidden_state
        cache = model(input_ids=x[:, :5], use_cache=True).past_key_values
        last = model(input_ids=x[:, 5:], past_key_values=cache).last_hidden_state
    torch.testing.assert_close(last, full[:, 5:], atol=1e-5, rtol=1e-5)


def test_left_padded_row_equals_row_alone():
    model = tiny()
    x = ids(1, 6)
    padded = torch.cat([torch.full((1, 3), PAD), x], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(input_ids=x).logits
        batched = model(
            input_ids=torch.cat([padded, ids(1, 9, seed=5)]), attention_mask=torch.cat([mask, mask.clamp(1)])
        )
    torch.testing.assert_close(batched.logits[:1, 3:], alone, atol=1e-5, rtol=1e-5)


def test_sequence_classifier_reads_the_last_real_token():
    model = tiny(GPT2ForSequenceClassification)
    x = ids(1, 5)
    with torch.no_grad():
        alone = model(input_ids=x).logits
        right = model(
            input_ids=torch.cat([x, torch.full((1, 3), PAD)], 1), attention_mask=torch.tensor([[1] * 5 + [0] * 3])
        )
        left = model(
            input_ids=torch.cat([torch.full((1, 3), PAD), x], 1), attention_mask=torch.tensor([[0] * 3 + [1] * 5])
        )
    torch.testing.assert_close(right.logits, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left.logits, alone, atol=1e-5, rtol=1e-5)
    no_pad = tiny(GPT2ForSequenceClassification, pad_token_id=None)
    with pytest.raises(ValueError, match="pad_token_id"):
        no_pad(input_ids=ids(2, 5))


def test_eager_and_sdpa_agree():
    sdpa = tiny(scale_attn_by_inverse_layer_idx=True)
    eager = tiny(scale_attn_by_inverse_layer_idx=True, attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    x, mask = ids(2, 7), torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    with torch.no_grad():
        a, b = sdpa(input_ids=x, attention_mask=mask).logits, eager(input_ids=x, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=1e-5)


def test_attention_scale_options_change_the_scores():
    base = tiny()
    x = ids(1, 6)
    with torch.no_grad():
        reference = base(input_ids=x).logits
        for option in (dict(scale_attn_by_inverse_layer_idx=True), dict(scale_attn_weights=False)):
            other = GPT2LMHeadModel(tiny_config(**option)).eval()
            other.load_state_dict(base.state_dict())
            assert not torch.allclose(other(input_ids=x).logits, reference)
    layered = GPT2Model(tiny_config(scale_attn_by_inverse_layer_idx=True))
    assert [block.attn.scale for block in layered.layers] == [8**-0.5, 8**-0.5 / 2]


def test_embedding_dropout_is_applied_in_training():
    model = tiny(GPT2Model, embd_dropout=0.5).train()
    x = ids(1, 6)
    a, b = model(input_ids=x).last_hidden_state, model(input_ids=x).last_hidden_state
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(input_ids=x).last_hidden_state, model(input_ids=x).last_hidden_state)


def test_lm_head_is_tied_and_saved_once(tmp_path):
    from safetensors.torch import load_file

    model = tiny()
    assert model.head.lm_head.weight is model.backbone.embed.tokens.weight
    model.save_pretrained(tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    assert "transformer.h.0.attn.c_attn.weight" in names and not any("[" in name for name in names)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert reloaded.head.lm_head.weight is reloaded.backbone.embed.tokens.weight


def test_conv1d_conversion_round_trips():
    model = tiny(GPT2Model)
    hf = model.hf_state_dict()
    C = TINY["hidden_size"]
    assert hf["h.0.attn.c_attn.weight"].shape == (C, 3 * C)  # Conv1D: (in, out)
    assert hf["h.0.mlp.c_fc.weight"].shape == (C, 4 * C)
    torch.testing.assert_close(hf["h.0.attn.c_attn.weight"][:, C : 2 * C], model.layers[0].attn.k_proj.weight.t())
    back = GPT2PreTrainedModel.preprocess_hf(hf)
    torch.testing.assert_close(back["h.1.attn.c_attn.bias[v]"], model.layers[1].attn.v_proj.bias)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_save_load_round_trip(tmp_path, task):
    model = tiny(TASKS[task])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_embd"] == 32 and config["n_inner"] is None
    reloaded = bunmyaku.from_pretrained(tmp_path)
    assert type(reloaded) is type(model)
    x = ids(6, 7).view(2, 3, 7) if task == "pair-classification" else ids(2, 7)
    with torch.no_grad():
        a, b = model(input_ids=x), reloaded(input_ids=x)
    for field in a.keys():
        if isinstance(a[field], torch.Tensor):
            torch.testing.assert_close(a[field], b[field])


def test_mismatched_checkpoint_names_the_tensors(tmp_path):
    tiny().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_embd"] = 40
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        bunmyaku.from_pretrained(tmp_path)
    message = str(error.value)
    for name in ("transformer.wte.weight", "transformer.h.1.mlp.c_fc.weight", "transformer.h.0.attn.c_attn.weight[q]"):
        assert name in message
    assert "missing" not in message  # mis-shaped tensors are present, not also missing


def test_config_validation():
    with pytest.raises(ValueError, match="not a multiple"):
        GPT2Config(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="summary_type"):
        GPT2Config(summary_type="attn")
    with pytest.raises(ValueError, match="activation"):
        GPT2Config(hidden_act="nope")
    with pytest.raises(ValueError, match="cross-attention"):
        GPT2Config(add_cross_attention=True)


def test_too_many_positions_is_an_actionable_error():
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny()(input_ids=ids(1, 33))


def test_gradient_checkpointing_gives_the_same_gradients():
    x = ids(2, 7)
    mask = torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    grads = []
    for checkpointing in (False, True):
        model = tiny().train()
        model.gradient_checkpointing_enable(checkpointing)
        model(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100)).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_double_heads_summary_reads_mc_token_ids():
    model = tiny(GPT2DoubleHeadsModel)
    x = ids(6, 7).view(2, 3, 7)
    with torch.no_grad():
        default = model(input_ids=x).mc_logits
        last = model(input_ids=x, mc_token_ids=torch.full((2, 3), 6)).mc_logits
        earlier = model(input_ids=x, mc_token_ids=torch.full((2, 3), 3)).mc_logits
        out = model(input_ids=x, labels=x, mc_labels=torch.tensor([1, 2]))
    torch.testing.assert_close(default, last)
    assert not torch.allclose(default, earlier)
    assert out.loss is not None and out.mc_loss is not None
    last_type = dataclasses.replace(model.config, summary_type="last")
    other = GPT2DoubleHeadsModel(last_type).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=x).mc_logits, default)


def test_causal_lm_overfits_one_batch():
    model = tiny(seed=1).train()
    x = ids(2, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss = model(input_ids=x, labels=x).loss
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first
