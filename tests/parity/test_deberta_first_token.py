"""Work a DeBERTa training step skips, and that it changes nothing: the first-token path of the pooled heads
(``first_token_only``: the last layer computes position 0 alone, its query, attention and MLP, keys and values from
every position) gives the same logits, loss and gradients as the whole last layer, padded, unpadded and left-padded,
for v2 / v3 and v1 configurations; and only the relative embeddings a sequence's length reaches are projected."""

from __future__ import annotations

import pytest
import torch

import bunmyaku
from bunmyaku.models import deberta
from bunmyaku.models.disentangled import first_query_attention, reference_attention
from tests.conftest import require_module
from tests.parity.helpers import assert_close, save
from tests.parity.test_deberta import CONFIGS, V1_CONFIGS, VOCAB, _hf_model

require_module("transformers")


def _batch(padding: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([20, 7, 13, 20])
    real = torch.arange(20)[None] < lengths[:, None]
    mask = {"none": torch.ones_like(real), "right": real, "left": real.flip(-1)}[padding].long()
    return torch.randint(3, VOCAB, (4, 20), generator=gen) * mask, mask


def _full_path_loss(model, ids, mask, labels):
    """The loss with every position of the last layer computed (``first_token_only=False``)."""
    hidden = model.backbone(ids, mask).last_hidden_state  # (B, T, C)
    assert hidden.shape[1] == ids.shape[1]
    return deberta.deberta_sequence_loss(model.config, model._classify(hidden), labels), model._classify(hidden)


@pytest.mark.parametrize("name", [*CONFIGS, *V1_CONFIGS])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_first_token_path_equals_full_last_layer(tmp_path, name, padding):
    """Left padding puts the pooled position at padding: its attention row is fully masked, and the fast kernel's
    gradient there is not the reference's (see ``disentangled._PositionBias``), so that case is compared on the
    eager reference path, where the first-token path must give the reference's gradients too."""
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf_model = _hf_model(name, "sequence-classification", seed=11, **no_dropout)
    folder = save(hf_model, tmp_path / "hf")
    for implementation in ["eager"] if padding == "left" else ["sdpa", "eager"]:
        model = bunmyaku.from_pretrained(folder, attn_implementation=implementation).train()
        _check_first_token_path(model, *_batch(padding))


def _check_first_token_path(model, ids, mask):
    labels = torch.tensor([2, 0, 1, 1])
    # the head's own call takes the first-token path: the backbone returns position 0 only
    assert model._encode(ids, mask, None, None, None, False).last_hidden_state.shape[1] == 1
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss, logits = _full_path_loss(model, ids, mask, labels)
    loss.backward()
    assert_close(out.logits, logits, atol=1e-5)
    assert_close(out.loss, loss, atol=1e-6)
    unread = {"backbone.rel_embed.weight"} if not model.config.position_terms else set()  # no term reads them
    for n, p in model.named_parameters():
        if n in unread:
            assert grads[n] is None and p.grad is None, n
            continue
        assert p.grad is not None, n
        assert_close(grads[n], p.grad, atol=1e-6)


def test_first_query_attention_is_row_zero_of_the_reference():
    """Against the transformers-style reference (gathers over the whole (T, T) score matrix), row 0, with a
    padded key, a fully padded first query (uniform weights), and each position term alone."""
    gen = torch.Generator().manual_seed(0)
    B, H, T, D, span = 3, 2, 9, 4, 4
    q, k, v = (torch.randn(B, H, T, D, generator=gen) for _ in range(3))
    pos_q, pos_k = torch.randn(H, 2 * span, D, generator=gen), torch.randn(H, 2 * span, D, generator=gen)
    relative_pos = deberta.relative_positions(T, span, 8)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, :3] = 0  # position 0 is padding: the reference spreads it evenly over every key
    for pq, pk in ((pos_q, pos_k), (pos_q, None), (None, pos_k)):
        expected = reference_attention(q, k, v, pq, pk, relative_pos, span, mask, 0.25)[:, :, :1]
        got = first_query_attention(q[:, :, :1], k, v, pq, pk, relative_pos, span, mask, 0.25)
        assert_close(got, expected, atol=1e-6)


def test_first_token_only_refuses_hidden_states():
    config = deberta.DebertaV2Config(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37)
    model = deberta.DebertaV2Model.from_config(config)
    with pytest.raises(ValueError, match="first_token_only"):
        model(torch.ones(1, 5, dtype=torch.long), output_hidden_states=True, first_token_only=True)


@pytest.mark.parametrize(
    ("buckets", "max_position", "length"), [(256, 512, 128), (256, 512, 512), (8, 16, 3), (8, 16, 20)]
)
def test_only_the_reached_relative_embeddings_are_projected(buckets, max_position, length):
    """The projected tables equal the whole table's projection at every row the sequence's relative positions
    index (the rows the kernels read), and are zeros elsewhere; deberta-v3-base at T = 128 projects half its rows."""
    config = deberta.DebertaV2Config(
        vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=37, relative_attention=True,
        position_buckets=buckets, max_relative_positions=max_position, pos_att_type="p2c|c2p", share_att_key=True,
    )  # fmt: skip
    attn = deberta.DisentangledAttention(config)
    span = config.att_span
    rel = torch.randn(2 * span, 32)
    pos_q, pos_k, got_span = attn._project_positions(rel, length)
    full_q, full_k = attn._heads(attn.q_proj(rel)), attn._heads(attn.k_proj(rel))
    assert got_span == span and pos_q.shape == full_q.shape and pos_k.shape == full_k.shape
    relative_pos = deberta.relative_positions(length, buckets, max_position)
    read = torch.zeros(2 * span, dtype=torch.bool)
    read[torch.clamp(relative_pos + span, 0, 2 * span - 1).flatten()] = True
    read[torch.clamp(-relative_pos + span, 0, 2 * span - 1).flatten()] = True
    assert_close(pos_q[:, read], full_q[:, read], atol=1e-6)
    assert_close(pos_k[:, read], full_k[:, read], atol=1e-6)
    projected = pos_q.abs().sum((0, 2)) > 0
    assert not (read & ~projected).any() and projected.sum() <= read.sum() + 1  # one row to spare, at most
    if (buckets, length) == (256, 128):
        assert int(projected.sum()) == 256  # of 512
