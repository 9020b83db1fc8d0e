"""ModernBERT's local layers run on the shared sliding window (sparse_attention), never a (T, T) band: the windowed
output equals the band |t - s| <= local_attention // 2 written out densely, padded batches included."""

from __future__ import annotations

import math

import pytest
import torch

from bunmyaku.models import modernbert
from bunmyaku.models import sparse_attention as sa
from bunmyaku.models.modernbert import ModernBertConfig, ModernBertModel


def _config(**extra) -> ModernBertConfig:
    fields = dict(vocab_size=99, hidden_size=32, intermediate_size=40, num_layers=2, num_heads=4, max_seq_len=64)
    fields.update(global_attn_every_n_layers=2, local_attention=11, pad_token_id=0, unpad=False)  # W = 5
    return ModernBertConfig(**{**fields, **extra})


def _band_reference(layer: modernbert.ModernBertAttention, x, attention_mask, rotary) -> torch.Tensor:
    """The local layer the plain way: scores of every (t, s), kept where |t - s| <= W and s is real, softmax; a
    query with no such key outputs zeros (what SDPA, and so transformers, gives a fully masked row)."""
    B, T, C = x.shape
    H, D, W = layer.num_heads, layer.head_dim, layer.window
    q, k, v = layer.qkv_proj(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k = modernbert.apply_rotary(q, *rotary), modernbert.apply_rotary(k, *rotary)
    t = torch.arange(T, device=x.device)
    sees = ((t[:, None] - t[None, :]).abs() <= W)[None] & attention_mask.bool()[:, None, :]  # (B, T, T)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(~sees[:, None], float("-inf"))
    weights = torch.nan_to_num(scores.softmax(-1), nan=0.0)  # rows with no key: all -inf -> NaN -> zeros
    y = (weights @ v).transpose(1, 2).reshape(B, T, C)
    return layer.out_proj(y)


@pytest.mark.parametrize("block", [4, 64])  # many query blocks, and one block over the whole sequence
def test_local_layer_equals_dense_band_on_padded_batch(monkeypatch, block):
    monkeypatch.setattr(sa, "MIN_BLOCK", block)

    def no_band(*_):
        raise AssertionError("the sdpa path built a dense (T, T) band")

    monkeypatch.setattr(modernbert, "band_mask", no_band)
    torch.manual_seed(0)
    model = ModernBertModel(_config()).eval()
    layer = model.layers[1].attn
    assert layer.window == 5
    B, T = 3, 37
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, 20:] = 0  # right padding: queries 26.. see no real key in their window
    attention_mask[2, :9] = 0  # left padding
    x = torch.randn(B, T, 32, requires_grad=True)
    rotary = model.rotary_local(torch.arange(T)[None], x.dtype)
    mask = model._masks(attention_mask, T, x.device)[False]
    assert isinstance(mask, sa.SparsePattern)
    ours = layer(x, mask, rotary)
    x2 = x.detach().clone().requires_grad_()
    expected = _band_reference(layer, x2, attention_mask, rotary)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)  # every position, padding included
    # the batch holds both kinds of padding query: one that sees real keys (21), one that sees none (30: zeros)
    assert expected[1, 21].abs().max() > 0.01 and expected[1, 30].abs().max() == 0
    grad = torch.randn_like(ours)
    (ours * grad).sum().backward()
    (expected * grad).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)


def test_whole_model_windowed_equals_eager_band(monkeypatch):
    """Every path of the model (padded, packed row groups) against the eager path, which keeps the dense band."""
    monkeypatch.setattr(sa, "MIN_BLOCK", 4)
    torch.manual_seed(1)
    eager = ModernBertModel(_config(attn_implementation="eager")).eval()
    ids = torch.randint(3, 99, (3, 40))
    attention_mask = torch.ones(3, 40, dtype=torch.long)
    attention_mask[1, 23:] = 0
    attention_mask[2, 5:] = 0
    with torch.no_grad():
        expected = eager(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        windowed = ModernBertModel(_config())
        windowed.load_state_dict(eager.state_dict())
        windowed.eval()
        real = attention_mask.bool()
        for unpad in (False, True):
            out = windowed(input_ids=ids, attention_mask=attention_mask, unpad=unpad).last_hidden_state
            torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=1e-5)


def test_local_layer_flex_route_equals_dense_band_on_cpu(flex_on_cpu):
    """The local layer's CUDA route (FlexAttention with the band's BlockMask) run eagerly on the CPU, padded batch."""
    torch.manual_seed(3)
    model = ModernBertModel(_config()).eval()
    layer = model.layers[1].attn
    B, T = 3, 37
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, 20:] = 0
    attention_mask[2, :9] = 0
    x = torch.randn(B, T, 32)
    rotary = model.rotary_local(torch.arange(T)[None], x.dtype)
    with torch.no_grad():
        ours = layer(x, model._masks(attention_mask, T, x.device)[False], rotary)
        expected = _band_reference(layer, x, attention_mask, rotary)
    assert flex_on_cpu == ["sparse"]
    real = attention_mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_local_layer_on_flex_attention_equals_dense_band():
    torch.manual_seed(2)
    model = ModernBertModel(_config(local_attention=64, max_seq_len=1024)).eval().cuda()
    layer = model.layers[1].attn
    B, T = 2, 700
    attention_mask = torch.ones(B, T, dtype=torch.long, device="cuda")
    attention_mask[1, 400:] = 0
    x = torch.randn(B, T, 32, device="cuda")
    rotary = model.rotary_local(torch.arange(T, device="cuda")[None], x.dtype)
    with torch.no_grad():
        ours = layer(x, model._masks(attention_mask, T, x.device)[False], rotary)
        expected = _band_reference(layer, x, attention_mask, rotary)
    assert sa._compiled_flex is not None  # the flex path ran
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=2e-4)
