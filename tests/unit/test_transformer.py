"""The encoder-decoder Transformer on its own: shapes, masking, the KV cache, checkpoints, positions, generation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import bunmyaku
from bunmyaku.hub import CheckpointError
from bunmyaku.models.attention import KVCache
from bunmyaku.models.transformer import (
    TransformerConfig,
    TransformerForSeq2SeqLM,
    TransformerModel,
    shift_tokens_right,
)
from tests.parity.helpers import randomize, right_padded_batch

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    encoder_num_layers=2,
    decoder_num_layers=2,
    encoder_num_heads=4,
    decoder_num_heads=2,
    encoder_intermediate_size=37,
    decoder_intermediate_size=29,
    hidden_act="swish",
    max_seq_len=32,
    scale_embedding=True,
    pad_token_id=98,
    decoder_start_token_id=98,
    eos_token_id=2,
)
# the three supported embedding layouts: shared and tied; separate and tied; three separate matrices
LAYOUTS = {
    "shared": {},
    "separate": dict(
        share_encoder_decoder_embeddings=False, decoder_vocab_size=71, pad_token_id=70, decoder_start_token_id=70
    ),
    "untied": dict(share_encoder_decoder_embeddings=False, tie_word_embeddings=False),
}


def _model(cls=TransformerForSeq2SeqLM, seed=0, **overrides):
    torch.manual_seed(seed)
    model = cls.from_config(TransformerConfig(**{**TINY, **overrides}))
    randomize(model, seed=seed)
    with torch.no_grad():
        if isinstance(model, TransformerForSeq2SeqLM):
            model.head.final_logits_bias.normal_()
    return model.eval()


def _batch(config: TransformerConfig, target_len=6, seed=0):
    ids, mask = right_padded_batch(config.vocab_size, seed=seed)
    target, _ = right_padded_batch(config.decoder_vocab_size, length=target_len, seed=seed + 1)
    target[:, 0] = config.decoder_start_token_id
    return ids, mask, target


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_shapes(layout):
    model = _model(**LAYOUTS[layout])
    config = model.config
    ids, mask, target = _batch(config)
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=target, use_cache=True)
    assert out.logits.shape == (3, 6, config.decoder_vocab_size)
    assert out.encoder_last_hidden_state.shape == (3, 9, 32)
    assert isinstance(out.past_key_values, KVCache) and len(out.past_key_values) == 6
    base = _model(TransformerModel, **LAYOUTS[layout])
    out = base(input_ids=ids, attention_mask=mask, decoder_input_ids=target)
    assert out.last_hidden_state.shape == (3, 6, 32) and out.past_key_values is None


def test_tied_and_shared_matrices_are_one_tensor():
    model = _model()
    shared = model.backbone.shared.weight
    assert model.backbone.encoder.embed.tokens.weight is shared
    assert model.backbone.decoder.embed.tokens.weight is shared
    assert model.head.proj is None  # the output layer reads the shared matrix
    separate = _model(**LAYOUTS["separate"])
    assert separate.backbone.shared is None
    assert separate.backbone.encoder.embed.tokens.weight.shape == (99, 32)
    assert separate.backbone.decoder.embed.tokens.weight.shape == (71, 32)
    untied = _model(**LAYOUTS["untied"])
    assert untied.head.proj.weight is not untied.backbone.decoder.embed.tokens.weight


def test_no_causal_leakage_in_the_decoder():
    model = _model()
    ids, mask, target = _batch(model.config)
    changed = target.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 90
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
        b = model(input_ids=ids, attention_mask=mask, decoder_input_ids=changed).logits
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert (a[:, 3:] - b[:, 3:]).abs().amax(dim=-1).gt(1e-4).all()  # later positions do see the change


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kv_cache_step_by_step_equals_full_forward(layout):
    model = _model(**LAYOUTS[layout])
    ids, mask, target = _batch(model.config, target_len=7)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
        memory = model.encode(ids, mask)
        cache = KVCache()
        steps = [
            model(
                decoder_input_ids=target[:, :3], encoder_outputs=memory, attention_mask=mask, past_key_values=cache
            ).logits
        ]  # a prefix first, then one token at a time
        for t in range(3, 7):
            steps.append(model.next_token_logits(target[:, t : t + 1], memory, mask, cache)[:, None])
    assert len(cache) == 7 and len(cache.cross) == model.config.decoder_num_layers
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_source_padding_does_not_change_the_translation_of_a_row():
    model = _model()
    ids, mask, target = _batch(model.config)
    row, length = 2, int(mask[2].sum())
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, decoder_input_ids=target)
        alone = model(input_ids=ids[row : row + 1, :length], decoder_input_ids=target[row : row + 1])
        other_padding = ids.clone()
        other_padding[mask == 0] = 5  # whatever sits under the padding is ignored
        repadded = model(input_ids=other_padding, attention_mask=mask, decoder_input_ids=target)
    torch.testing.assert_close(batched.logits[row], alone.logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.encoder_last_hidden_state[row, :length], alone.encoder_last_hidden_state[0])
    torch.testing.assert_close(repadded.logits, batched.logits)


def test_eager_attention_equals_sdpa():
    model = _model()
    eager = TransformerForSeq2SeqLM(dataclasses.replace(model.config, attn_implementation="eager")).eval()
    eager.load_state_dict(model.state_dict())
    ids, mask, target = _batch(model.config)
    target_mask = torch.ones_like(target)
    target_mask[1, 4:] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=target, decoder_attention_mask=target_mask)
    with torch.no_grad():
        a, b = model(**kwargs), eager(**kwargs)
    torch.testing.assert_close(a.logits[target_mask.bool()], b.logits[target_mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_save_load_round_trip(tmp_path, layout):
    model = _model(**LAYOUTS[layout])
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert "final_logits_bias" in saved and not any("embed_positions" in k for k in saved)  # fixed, not stored
    assert ("lm_head.weight" in saved) == (layout == "untied")
    loaded = bunmyaku.from_pretrained(tmp_path)
    assert isinstance(loaded, TransformerForSeq2SeqLM)
    assert dataclasses.replace(loaded.config, architectures=None) == model.config
    ids, mask, target = _batch(model.config)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits,
            model(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits,
        )
    if layout == "shared":
        assert loaded.backbone.decoder.embed.tokens.weight is loaded.backbone.shared.weight


def test_mismatched_checkpoint_error_names_tensors(tmp_path):
    _model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.decoder.layers.1.encoder_attn.k_proj.weight"]
    state["model.encoder.layers.0.fc1.weight"] = torch.zeros(5, 32)
    state["model.encoder.layers.0.adapter.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        bunmyaku.from_pretrained(tmp_path)
    message = str(error.value)
    assert "backbone.decoder.layers.1.cross_attn.k_proj.weight" in message  # missing, under our name
    assert "model.encoder.layers.0.fc1.weight: checkpoint (5, 32), model (37, 32)" in message
    assert "model.encoder.layers.0.adapter.weight" in message


def test_stored_positions_must_be_the_fixed_sinusoids(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    table = model.backbone.encoder.embed.positions
    state["model.encoder.embed_positions.weight"] = table.clone()
    save_file(state, tmp_path / "model.safetensors")
    bunmyaku.from_pretrained(tmp_path)  # the exact table is accepted and rebuilt
    state["model.decoder.embed_positions.weight"] = table + 0.1
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.decoder.embed_positions.weight"):
        bunmyaku.from_pretrained(tmp_path)


@pytest.mark.parametrize("dim", [32, 33])
def test_sinusoidal_positions_follow_the_paper(dim):
    """§3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    config = TransformerConfig(**{**TINY, "hidden_size": dim, "encoder_num_heads": 1, "decoder_num_heads": 1})
    table = TransformerModel(config).encoder.embed.positions  # (max_seq_len, d)
    paper = torch.zeros(config.max_seq_len, dim, dtype=torch.float64)
    for pos in range(config.max_seq_len):
        for j in range(dim):
            angle = pos / 10000 ** (2 * (j // 2) / dim)
            paper[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    # Marian stores the same numbers with all sines first, then all cosines
    torch.testing.assert_close(table, torch.cat([paper[:, 0::2], paper[:, 1::2]], dim=1).float())
    assert "encoder.embed.positions" not in TransformerModel(config).state_dict()  # fixed: never learned or saved


def test_embeddings_are_scaled_by_sqrt_d_model_when_configured():
    model = _model(TransformerModel)
    ids = torch.tensor([[5, 6, 7]])
    embed = model.encoder.embed
    expected = model.shared(ids) * math.sqrt(32) + embed.positions[:3]
    torch.testing.assert_close(embed(ids), expected)
    unscaled = _model(TransformerModel, scale_embedding=False).encoder.embed
    torch.testing.assert_close(unscaled(ids), unscaled.tokens(ids) + unscaled.positions[:3])


def test_labels_are_shifted_right_into_decoder_inputs_and_the_loss_ignores_minus_100():
    labels = torch.tensor([[11, 12, 2, -100], [13, 2, -100, -100]])
    assert shift_tokens_right(labels, 98, 98).tolist() == [[98, 11, 12, 2], [98, 13, 2, 98]]
    model = _model()
    ids, mask, _ = _batch(model.config)
    out = model(input_ids=ids[:2], attention_mask=mask[:2], labels=labels)
    logits = model(input_ids=ids[:2], attention_mask=mask[:2], decoder_input_ids=shift_tokens_right(labels, 98, 98))
    torch.testing.assert_close(out.logits, logits.logits)
    expected = F.cross_entropy(out.logits.view(-1, 99), labels.view(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_config_validation_and_hf_names():
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        TransformerConfig(**{**TINY, "tie_word_embeddings": False})
    with pytest.raises(ValueError, match="decoder_vocab_size"):
        TransformerConfig(**{**TINY, "decoder_vocab_size": 50})
    with pytest.raises(ValueError, match="decoder_num_heads 5"):
        TransformerConfig(**{**TINY, "decoder_num_heads": 5})
    with pytest.raises(ValueError, match="normalize_before"):
        TransformerConfig.from_hf({"d_model": 32, "encoder_attention_heads": 4, "normalize_before": True})
    hf = TransformerConfig(**TINY).to_hf()
    assert hf["d_model"] == 32 and hf["encoder_layers"] == 2 and hf["decoder_attention_heads"] == 2
    assert hf["activation_function"] == "swish" and hf["model_type"] == "marian" and hf["decoder_vocab_size"] == 99
    assert TransformerConfig.from_hf(hf) == TransformerConfig(**TINY)


def test_greedy_generation_equals_argmax_over_full_forwards():
    model = _model(seed=3)
    ids, mask, _ = _batch(model.config, seed=3)
    out = model.generate(ids, mask, max_new_tokens=6)
    tokens = torch.full((3, 1), 98)
    with torch.no_grad():
        for _ in range(6):  # no cache: the whole prefix every step
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=tokens).logits[:, -1]
            logits[:, 98] = -math.inf  # the padding id is never generated
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    finished = torch.zeros(3, dtype=torch.bool)
    for t in range(1, out.size(1)):  # identical up to each row's end token, padding after it
        assert (out[~finished, t] == tokens[~finished, t]).all() and (out[finished, t] == 98).all()
        finished |= out[:, t] == 2


def test_beam_search_returns_finished_sentences_padded():
    model = _model(seed=4)
    ids, mask, _ = _batch(model.config, seed=4)
    out = model.generate(ids, mask, max_new_tokens=5, num_beams=3, eos_token_id=[2, 7])
    assert out[:, 0].eq(98).all() and out.size(1) <= 6
    for row in out.tolist():
        ends = [i for i, t in enumerate(row) if t in (2, 7)]
        body = row[1 : ends[0] + 1] if ends else row[1:]
        assert 98 not in body and all(t == 98 for t in row[len(body) + 1 :])
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(ids, mask, num_beams=0)


def test_overfits_one_batch():
    model = _model(seed=5, dropout=0.0).train()
    ids, mask, target = _batch(model.config, seed=5)
    labels = target.roll(-1, dims=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


@pytest.mark.parametrize("beams", [1, 3])
def test_batched_translation_is_the_same_with_packed_weights(monkeypatch, beams):
    """Batched decoding of 16+ tokens on a CPU reads oneDNN-packed weights: the same tokens as the plain ones."""
    from bunmyaku.models import linear

    if not linear.ONEDNN_AVAILABLE:
        pytest.skip("oneDNN linear exists on x86 CPUs only")
    monkeypatch.setattr(linear, "CPU_ONEDNN", True)  # also where it is off by default (no AVX-512)
    packed_calls = []
    reorder = linear._REORDER_OP
    monkeypatch.setattr(linear, "_REORDER_OP", lambda w, rows: packed_calls.append(rows) or reorder(w, rows))
    model = _model(seed=5)
    ids, mask, _ = _batch(model.config, seed=5)
    packed = model.generate(ids, mask, max_new_tokens=16, num_beams=beams, eos_token_id=[2])
    assert packed_calls and set(packed_calls) == {ids.size(0) * beams}
    monkeypatch.setattr(linear, "PACKED_DECODING", False)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=16, num_beams=beams, eos_token_id=[2]), packed)
