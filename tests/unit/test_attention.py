"""The shared attention pieces: the fused path equals the talk's equations; masks, positions, cache."""

from __future__ import annotations

import math

import pytest
import torch

from bunmyaku.models.attention import (
    KVCache,
    RotaryEmbedding,
    apply_rotary,
    causal_mask,
    eager_attention,
    padding_mask,
    positions_from_mask,
    sdpa_attention,
    sinusoidal_positions,
)


def _qkv(B=2, H=4, K=4, T=5, S=5, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, T, D, generator=g),
        torch.randn(B, K, S, D, generator=g),
        torch.randn(B, K, S, D, generator=g),
    )


def test_eager_is_softmax_qk_v_written_out():
    q, k, v = _qkv(B=1, H=1, K=1, T=3, S=4, D=2)
    scores = q[0, 0] @ k[0, 0].T / math.sqrt(2)
    weights = torch.exp(scores) / torch.exp(scores).sum(-1, keepdim=True)
    torch.testing.assert_close(eager_attention(q, k, v)[0, 0], weights @ v[0, 0])


@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (4, 1)])
def test_sdpa_equals_eager_with_padding_causal_and_gqa(heads):
    H, K = heads
    q, k, v = _qkv(H=H, K=K, T=6, S=6)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    for mask, is_causal in [
        (padding_mask(attention_mask), False),
        (None, True),
        (causal_mask(attention_mask, 6, 6, "cpu"), False),
    ]:
        torch.testing.assert_close(
            sdpa_attention(q, k, v, mask, is_causal), eager_attention(q, k, v, mask, is_causal), atol=1e-5, rtol=1e-5
        )


def test_masks():
    assert padding_mask(torch.ones(2, 3)) is None  # nothing padded: the fast kernel path
    assert padding_mask(torch.tensor([[1, 1, 0]])).tolist() == [[[[True, True, False]]]]
    assert causal_mask(None, 4, 4, "cpu") is None
    # one new query with 3 cached keys sees all 4 keys: no mask needed unless something is padded
    assert causal_mask(None, 1, 4, "cpu") is None
    assert causal_mask(torch.ones(2, 4), 1, 4, "cpu") is None
    assert causal_mask(torch.tensor([[0, 1, 1, 1]]), 1, 4, "cpu").tolist() == [[[[False, True, True, True]]]]
    # two new queries after 2 cached keys: the first sees 3 keys, the second all 4
    assert causal_mask(None, 2, 4, "cpu")[0, 0].tolist() == [[True, True, True, False], [True, True, True, True]]
    m = causal_mask(torch.tensor([[0, 1, 1]]), 3, 3, "cpu")[0, 0]
    assert m[2].tolist() == [False, True, True] and m[1].tolist() == [False, True, False]
    assert m[0].tolist() == [True, False, False]  # a padding query row sees its causal (padding) keys, not NaN


def test_positions_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask, 5, 0, "cpu").tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert positions_from_mask(mask, 1, 4, "cpu").tolist() == [[2], [4]]
    assert positions_from_mask(None, 2, 3, "cpu").tolist() == [[3, 4]]


def test_sinusoidal_matches_the_paper():
    pe = sinusoidal_positions(50, 16)
    p, i = 7, 3
    assert pe[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 16)), abs=1e-6)
    assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 16)), abs=1e-6)
    halves = sinusoidal_positions(50, 16, interleave=False)
    torch.testing.assert_close(halves[:, :8], pe[:, 0::2])
    torch.testing.assert_close(halves[:, 8:], pe[:, 1::2])


def test_rotary_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(8, base=10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([[pq]]), torch.float32)
        ck, sk = rope(torch.tensor([[pk]]), torch.float32)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item()

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


def test_kv_cache_appends_and_reorders():
    cache = KVCache()
    k1, v1 = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    cache.update(0, k1, v1)
    k, _ = cache.update(0, torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4))
    assert k.shape == (2, 1, 4, 4) and len(cache) == 4
    cache.reorder(torch.tensor([1, 1]))
    torch.testing.assert_close(cache.keys[0][0, :, :3], k1[1])


@pytest.mark.parametrize("rotary", [False, True])
def test_a_decoding_step_equals_the_last_row_of_causal_attention(rotary):
    """The decode path (fused q/k/v, q and k rotated together, static cache, no mask for one query) is exact."""
    from bunmyaku.models.attention import Attention, StaticKVCache
    from bunmyaku.models.config import LayerConfig

    torch.manual_seed(0)
    config = LayerConfig(
        hidden_size=24, num_heads=6, intermediate_size=8, hidden_act="gelu", pre_norm=True, num_kv_heads=2
    )
    attn = Attention(config).eval()
    x = torch.randn(2, 7, 24)
    rope = RotaryEmbedding(4)
    positions = torch.arange(7)[None].expand(2, -1)
    angles = rope(positions, torch.float32) if rotary else None
    full = attn(x, causal_mask(None, 7, 7, "cpu"), is_causal=True, rotary=angles)  # (2, 7, 24), grad mode
    cache = StaticKVCache(7)
    with torch.no_grad():
        attn(
            x[:, :6],
            None,
            is_causal=True,
            rotary=rope(positions[:, :6], torch.float32) if rotary else None,
            cache=cache,
        )
        mask = causal_mask(torch.ones(2, 7), 1, 7, "cpu")
        assert mask is None  # one query, nothing padded: attention runs without a mask
        step = attn(
            x[:, 6:],
            mask,
            is_causal=True,
            rotary=rope(positions[:, 6:], torch.float32) if rotary else None,
            cache=cache,
        )
    torch.testing.assert_close(step, full[:, 6:], atol=1e-5, rtol=1e-5)


def test_fast_path_dispatch():
    """Which calls Attention hands to models/fastpath.py: packed batches, and self-attention decoding steps (a cache,
    no gradient); never cross-attention, a call with ``context``, or a call that records gradients."""
    from bunmyaku.models import fastpath
    from bunmyaku.models.attention import Attention, KVCache
    from bunmyaku.models.config import LayerConfig

    config = LayerConfig(hidden_size=24, num_heads=6, intermediate_size=8, hidden_act="gelu", pre_norm=True)
    attn, cross = Attention(config), Attention(config, is_cross=True)
    packing = fastpath.Packing.from_mask(torch.tensor([[1, 1, 1], [1, 0, 0]]))
    context = torch.randn(1, 3, 24)
    assert fastpath.applies(attn, None, packing, None) and fastpath.applies(attn, None, packing, context)
    assert not fastpath.applies(attn, None, None, None)
    assert not fastpath.applies(attn, KVCache(), None, None)  # gradients on: training with a cache runs plain
    with torch.no_grad():
        assert fastpath.applies(attn, KVCache(), None, None)
        assert not fastpath.applies(cross, KVCache(), None, None)
        assert not fastpath.applies(attn, KVCache(), None, context)


def test_a_decoding_step_runs_one_fused_projection(monkeypatch):
    """Decoding through a GPT-2 block computes q, k and v in one product on the concatenated weights."""
    from bunmyaku.models import fastpath
    from bunmyaku.models.gpt2 import GPT2Config, GPT2LMHeadModel

    calls = []
    original = fastpath.fused_projection
    monkeypatch.setattr(fastpath, "fused_projection", lambda attn, x: calls.append(x.shape) or original(attn, x))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4)).eval()
    ids = torch.randint(0, 99, (2, 5))
    with torch.no_grad():
        model(input_ids=ids, use_cache=True)
    assert calls == [(2, 5, 32)] * 2  # one per layer


def test_layer_config_fills_its_defaults_and_refuses_bad_values():
    from bunmyaku.models.config import LayerConfig

    base = dict(hidden_size=24, num_heads=6, intermediate_size=8, hidden_act="gelu", pre_norm=True)
    config = LayerConfig(**base, attention_bias=False)
    assert (config.num_kv_heads, config.head_dim, config.attention_out_bias) == (6, 4, False)
    with pytest.raises(ValueError, match="'batchnorm'"):
        LayerConfig(**base, norm="batchnorm")
    with pytest.raises(ValueError, match="'geglu'"):
        LayerConfig(**base, mlp="geglu")
    with pytest.raises(ValueError, match="num_kv_heads 4"):
        LayerConfig(**base, num_kv_heads=4)
