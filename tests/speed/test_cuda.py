"""CUDA fast paths against the padded reference on the same GPU. Skipped without CUDA (CI has none); run on a
lent GPU with ``pytest tests/speed/test_cuda.py``.

bf16 results differ from fp32 by rounding, so a bf16 fast path is held to the padded reference's own bf16 error:
both are compared with fp32, and the fast path's error must be of the same size as the reference's.
"""

from __future__ import annotations

import pytest
import torch

from bunmyaku.models import fastpath
from bunmyaku.models.bert import BertConfig, BertForSequenceClassification, BertModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SHAPE = dict(vocab_size=1000, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512, max_seq_len=512)


def _batch(seed: int = 0, batch: int = 16, longest: int = 300):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, longest, (batch,), generator=gen)
    lengths[0] = longest
    mask = (torch.arange(longest)[None] < lengths[:, None]).long()
    ids = torch.randint(3, 1000, (batch, longest), generator=gen).masked_fill(mask == 0, 0)
    return ids.cuda(), mask.cuda()


def _pair(model_cls, **kw):
    torch.manual_seed(0)
    packed = model_cls.from_config(BertConfig(**SHAPE, **kw)).cuda()
    padded = model_cls(BertConfig(**SHAPE, unpad=False, **kw)).cuda()
    padded.load_state_dict(packed.state_dict())
    return packed, padded


def test_varlen_kernel_is_available_and_used(monkeypatch):
    assert fastpath.varlen_attn is not None, "this torch has no torch.nn.fastpath.varlen"
    calls = []
    original = fastpath.varlen_attn
    monkeypatch.setattr(fastpath, "varlen_attn", lambda *a, **k: calls.append(1) or original(*a, **k))
    packed, _ = _pair(BertModel)
    ids, mask = _batch()
    with torch.inference_mode():
        packed.to(torch.bfloat16).eval()(input_ids=ids, attention_mask=mask)
    assert len(calls) == SHAPE["num_layers"]


def test_bf16_varlen_error_is_the_padded_paths_own_bf16_error():
    """bf16 on the varlen path errs from fp32 as much as the padded path in bf16 does, per token, not more."""
    packed, padded = _pair(BertModel)
    ids, mask = _batch(1)
    real = mask.bool()
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.inference_mode():
        reference = padded.eval()(input_ids=ids, attention_mask=mask).last_hidden_state[real]  # fp32
        packed_bf16 = packed.to(torch.bfloat16).eval()(input_ids=ids, attention_mask=mask).last_hidden_state[real]
        padded_bf16 = padded.to(torch.bfloat16)(input_ids=ids, attention_mask=mask).last_hidden_state[real]
    packed_error = (packed_bf16.float() - reference).abs()  # (N, C)
    padded_error = (padded_bf16.float() - reference).abs()
    assert padded_error.max() > 0, "bf16 must round somewhere: the reference error cannot be zero"
    mean_ratio = packed_error.mean() / padded_error.mean()
    worst_ratio = packed_error.amax(-1).max() / padded_error.amax(-1).max()
    assert mean_ratio < 1.5, f"mean bf16 error {mean_ratio:.3f}x the padded path's"
    assert worst_ratio < 2.0, f"worst bf16 error {worst_ratio:.3f}x the padded path's"


def _autocast_gradients(models, ids, mask) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each model's flattened gradients after one bf16-autocast loss on the batch; and their cosine similarity."""
    labels = torch.arange(ids.size(0), device="cuda") % 2
    grads = []
    for model in models:
        model.train().zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads.append(torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None]))
    return grads, torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)


def test_autocast_training_gradients_match_padded():
    """Fine-tuning under bf16 autocast (dropout off, so both paths compute the same function): the packed path's
    gradient errs from the fp32 gradient no more than the padded path's own bf16 gradient does."""
    ids, mask = _batch(2)
    packed, padded = _pair(BertForSequenceClassification, dropout=0.0, attention_dropout=0.0)
    labels = torch.arange(ids.size(0), device="cuda") % 2
    torch.backends.cuda.matmul.allow_tf32 = False
    padded.train().zero_grad()
    padded(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()  # fp32, no autocast: the reference
    reference = torch.cat([p.grad.flatten() for p in padded.parameters() if p.grad is not None])
    grads, cosine = _autocast_gradients((packed, padded), ids, mask)
    packed_error, padded_error = (grads[0] - reference).norm(), (grads[1] - reference).norm()
    assert padded_error > 0, "bf16 autocast must round somewhere"
    assert packed_error < 1.5 * padded_error, f"bf16 gradient error {packed_error:.3g} vs padded {padded_error:.3g}"
    assert cosine > 0.999, f"gradient directions differ: cosine {cosine:.5f}"


def test_compiled_varlen_training_matches_eager():
    """torch.compile over the bf16 varlen training path (the bench's ``+compile`` rows): the same gradients as
    eager with dropout off, and with attention dropout on it still runs and learns (finite, non-zero grads)."""
    eager, _ = _pair(BertForSequenceClassification, dropout=0.0, attention_dropout=0.0)
    compiled, _ = _pair(BertForSequenceClassification, dropout=0.0, attention_dropout=0.0)
    compiled.compile()
    for seed in (4, 5):  # two token counts: the second recompiles as dynamic
        ids, mask = _batch(seed)
        _, cosine = _autocast_gradients((eager, compiled), ids, mask)
        assert cosine > 0.999, f"compiled gradients differ from eager: cosine {cosine:.5f}"
    dropped, _ = _pair(BertForSequenceClassification, attention_dropout=0.1)
    dropped.compile()
    grads, _ = _autocast_gradients((dropped, dropped), ids, mask)  # two steps, two dropout draws
    assert all(torch.isfinite(g).all() and g.norm() > 0 for g in grads)


def test_fp32_cuda_unpadded_equals_padded():
    """fp32 on CUDA takes the re-padding route (no varlen): equal to the padded path like on CPU."""
    packed, padded = (m.eval() for m in _pair(BertModel))
    torch.backends.cuda.matmul.allow_tf32 = False
    ids, mask = _batch(3)
    real = mask.bool()
    with torch.inference_mode():
        a = packed(input_ids=ids, attention_mask=mask).last_hidden_state[real]
        b = padded(input_ids=ids, attention_mask=mask).last_hidden_state[real]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_static_cache_generation_matches_dynamic_on_cuda():
    from bunmyaku.models.generation import generate
    from bunmyaku.models.gpt2 import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = (
        GPT2LMHeadModel.from_config(GPT2Config(vocab_size=500, num_layers=2, num_heads=4, hidden_size=64)).cuda().eval()
    )
    ids = torch.randint(0, 500, (3, 12), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.inference_mode():
        dynamic = generate(model, ids, mask, max_new_tokens=20)
        static = generate(model, ids, mask, max_new_tokens=20, cache="static")
    assert torch.equal(dynamic, static)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_graph_cache_replays_a_cuda_graph_and_matches_dynamic(family, monkeypatch):
    from bunmyaku.models.generation import generate
    from bunmyaku.models.gpt2 import GPT2Config, GPT2LMHeadModel
    from bunmyaku.models.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel.from_config(GPT2Config(vocab_size=500, num_layers=2, num_heads=4, hidden_size=64))
    else:
        config = LlamaConfig(
            vocab_size=500, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96
        )
        model = LlamaForCausalLM.from_config(config)
    model = model.cuda().eval()
    replays = []
    original = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: replays.append(1) or original(self))
    ids = torch.randint(0, 500, (3, 12), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.inference_mode():
        dynamic = generate(model, ids, mask, max_new_tokens=24)
        graph = generate(model, ids, mask, max_new_tokens=24, cache="graph")
    assert torch.equal(dynamic, graph)
    assert len(replays) == 23, "one replay per token after the prefill"


def _packed_qkv(seed: int, dtype=torch.float16, heads: int = 4, dim: int = 32):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([37, 5, 128, 64])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).cuda()
    q, k, v = (torch.randn(int(lengths.sum()), heads, dim, generator=gen).to("cuda", dtype) for _ in range(3))
    return q, k, v, cu, int(lengths.max())


def test_varlen_dropout_kernel_at_p0_equals_varlen_attn():
    """The aten call behind training's varlen path (p = 0): the same outputs and gradients as the public varlen_attn."""
    q, k, v, cu, longest = _packed_qkv(0)
    results = []
    for fn in (
        lambda q, k, v: fastpath.varlen_dropout_attention(q, k, v, cu, longest, 0.0),
        lambda q, k, v: fastpath.varlen_attn(q, k, v, cu, cu, longest, longest),
    ):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.float().square().sum().backward()
        results.append([out, *(t.grad for t in leaves)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


def test_varlen_dropout_backward_uses_the_forward_mask():
    """y = A v with A the dropped-out attention weights, so <y, g> = <v, A^T g> = <v, dL/dv> exactly; a backward
    that drew a different dropout mask would break the identity. Also: dropout is active, and seeded."""
    q, k, v, cu, longest = _packed_qkv(1)
    g = torch.randn_like(q)
    v = v.clone().requires_grad_()
    torch.manual_seed(0)
    y = fastpath.varlen_dropout_attention(q, k, v, cu, longest, 0.5)
    (y * g).float().sum().backward()
    lhs, rhs = (y.float() * g.float()).sum(), (v.detach().float() * v.grad.float()).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-2, atol=1e-2 * g.numel() ** 0.5)
    no_dropout = fastpath.varlen_dropout_attention(q, k, v.detach(), cu, longest, 0.0)
    assert (y.detach() - no_dropout).abs().max() > 0.1, "dropout had no effect"
    torch.manual_seed(0)
    again = fastpath.varlen_dropout_attention(q, k, v.detach(), cu, longest, 0.5)
    assert torch.equal(y.detach(), again), "the same seed must draw the same mask"


def test_training_with_attention_dropout_takes_varlen(monkeypatch):
    """BERT fine-tuning with its default dropout under bf16 autocast runs the packed rows through the varlen kernel
    (no per-layer re-padding), and the loss decreases."""
    calls = []
    original = fastpath.varlen_dropout_attention
    monkeypatch.setattr(fastpath, "varlen_dropout_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    model, _ = _pair(BertForSequenceClassification)
    assert model.config.attention_dropout > 0
    model.train()
    ids, mask = _batch(4)
    labels = torch.arange(ids.size(0), device="cuda") % 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # every layer but the last, which computes the [CLS] query alone (first_token_only) over the packed keys
    assert len(calls) == 8 * (SHAPE["num_layers"] - 1)
    assert losses[-1] < losses[0], losses


def test_graph_generation_memory_does_not_grow_with_calls():
    """Each graph-decoding call captures its own graph; nothing of it may outlive the call. (The H100 bench run of
    2026-11-26 saw peak memory grow ~36 MB per generate call in one worker process: one cuBLAS workspace per new
    warm-up stream, which PyTorch keeps until exit; the warm-up stream is now reused.)"""
    import gc

    from bunmyaku.models.generation import generate
    from bunmyaku.models.gpt2 import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=5000, num_layers=4, num_heads=8, hidden_size=512)
    model = GPT2LMHeadModel.from_config(config).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, 5000, (2, 64), device="cuda")
    allocated, peak = [], []
    with torch.inference_mode():
        for _ in range(6):
            torch.cuda.reset_peak_memory_stats()
            generate(model, ids, max_new_tokens=32, cache="graph")
            gc.collect()
            torch.cuda.synchronize()
            allocated.append(round(torch.cuda.memory_allocated() / 2**20, 1))
            peak.append(round(torch.cuda.max_memory_allocated() / 2**20, 1))
    print(
        f"weights {sum(p.numel() * 2 for p in model.parameters()) / 2**20:.1f} MB; after each call (MB) {allocated}; "
        f"peak within each call (MB) {peak}"
    )
    assert allocated[-1] - allocated[1] < 1.0, f"memory allocated after each call (MB): {allocated}"
