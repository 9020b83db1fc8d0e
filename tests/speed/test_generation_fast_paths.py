"""Generation fast paths: static KV cache, fixed-shape (CUDA graph) steps, last-position logits and fused q/k/v
give the same tokens and logits."""

from __future__ import annotations

import pytest
import torch

from bunmyaku.models.attention import StaticKVCache
from bunmyaku.models.generation import generate
from bunmyaku.models.gpt2 import GPT2Config, GPT2LMHeadModel
from bunmyaku.models.llama import LlamaConfig, LlamaForCausalLM

V = 61


def _llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
        max_seq_len=128, initializer_range=0.3,
    )  # fmt: skip
    return LlamaForCausalLM.from_config(config).eval()


def _gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=128, initializer_range=0.3)
    return GPT2LMHeadModel.from_config(config).eval()


MODELS = {"llama": _llama, "gpt2": _gpt2}


def _prompts():
    """Three prompts of lengths 6, 3 and 1, left-padded with id 0."""
    ids = torch.tensor([[5, 9, 13, 2, 40, 7], [0, 0, 0, 33, 21, 8], [0, 0, 0, 0, 0, 17]])
    return ids, (torch.arange(6) >= torch.tensor([[0], [3], [5]])).long()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("settings", [{}, {"do_sample": True, "top_k": 5, "seed": 3}, {"num_beams": 3}])
@pytest.mark.parametrize("cache", ["static", "graph"])
def test_static_and_graph_caches_give_the_same_tokens_as_the_dynamic_one(name, settings, cache):
    model = MODELS[name]()
    ids, mask = _prompts()
    dynamic = generate(model, ids, mask, max_new_tokens=12, **settings)
    fast = generate(model, ids, mask, max_new_tokens=12, cache=cache, **settings)
    assert dynamic.shape[1] > ids.shape[1]
    assert torch.equal(fast, dynamic)


@pytest.mark.parametrize("name", MODELS)
def test_graph_steps_stream_the_same_tokens_with_eos_and_penalty(name):
    """The graph path's step reads every cache slot under the mask: the same token at every step as the growing cache,
    with an end-of-sequence id that stops one row early and a repetition penalty reading the ids."""
    model = MODELS[name]()
    ids, mask = _prompts()
    seen = {}
    for cache in ("dynamic", "graph"):
        steps = []
        out = generate(
            model, ids, mask, max_new_tokens=10, cache=cache, eos_token_id=int(ids[0, 2]), repetition_penalty=1.2,
            streamer=lambda new, steps=steps: steps.append(new.clone()),
        )  # fmt: skip
        seen[cache] = (out, torch.stack(steps))
    assert torch.equal(seen["graph"][0], seen["dynamic"][0])
    assert torch.equal(seen["graph"][1], seen["dynamic"][1])


def test_a_written_index_makes_the_cache_fixed_shape():
    cache = StaticKVCache(max_len=6)
    k = torch.randn(2, 3, 4, 8)
    cache.update(0, k, k)  # a prefill: 4 positions
    cache.write_index = torch.tensor([4])
    new = torch.randn(2, 3, 1, 8)
    keys, _ = cache.update(0, new, new)
    assert keys.shape == (2, 3, 6, 8), "all max_len positions, every step"
    torch.testing.assert_close(keys[:, :, :4], k)
    torch.testing.assert_close(keys[:, :, 4:5], new)
    assert not keys[:, :, 5].any(), "an unwritten slot is zeros, never uninitialised memory"
    assert len(cache) == 4, "fixed-shape steps leave the host-side length alone"


def test_static_cache_grows_in_place_and_refuses_overflow():
    cache = StaticKVCache(max_len=5)
    k = torch.randn(2, 3, 4, 8)
    keys, _ = cache.update(0, k, k)
    storage = cache.keys[0].data_ptr()
    keys, values = cache.update(0, k[:, :, :1], k[:, :, :1])
    assert len(cache) == 5 and keys.shape == (2, 3, 5, 8) and cache.keys[0].data_ptr() == storage
    torch.testing.assert_close(keys[:, :, :4], k)
    with pytest.raises(ValueError, match="5 positions"):
        cache.update(0, k[:, :, :1], k[:, :, :1])


@pytest.mark.parametrize("name", MODELS)
def test_logits_to_keep_and_fused_qkv_match_a_full_forward(name):
    """A cached, no-grad forward (fused q/k/v) with one logit row equals the last row of a plain forward."""
    model = MODELS[name]()
    ids, mask = _prompts()
    full = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V), three separate q/k/v projections
    with torch.no_grad():
        last = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).logits  # (B, 1, V)
    assert last.shape == (3, 1, V)
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ids, labels=ids, logits_to_keep=1)


def test_fused_qkv_follows_in_place_weight_updates():
    model = _llama()
    ids = torch.randint(1, V, (1, 5))
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=True).logits
        model.backbone.layers[0].attn.k_proj.weight.mul_(2.0)  # an optimizer step or a load does this in place
        after = model(input_ids=ids, use_cache=True).logits
        reference = model(input_ids=ids).logits  # no cache: unfused
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference, atol=1e-5, rtol=1e-5)
