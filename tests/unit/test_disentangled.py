"""DeBERTa's disentangled attention (models/disentangled.py): every path against `transformers`' own
DisentangledSelfAttention, and against the paper's equation written out here with a dense (T, T) index."""

from __future__ import annotations

import math

import pytest
import torch

from bunmyaku.models import disentangled as dis
from bunmyaku.models.disentangled import disentangled_attention
from tests.conftest import require_module

require_module("transformers", "DeBERTa attention parity needs transformers as its oracle")
from transformers import DebertaV2Config  # noqa: E402
from transformers.models.deberta_v2.modeling_deberta_v2 import (  # noqa: E402
    DisentangledSelfAttention,
    build_relative_position,
)

HIDDEN, HEADS = 32, 4
HEAD_DIM = HIDDEN // HEADS
BOTH, C2P, P2C = ("c2p", "p2c"), ("c2p",), ("p2c",)
# (T, position_buckets, max_relative_positions): log buckets with a span below T (R = 2T - 1 > 2 span: the
# columns-after-product branch), log buckets with span >= T (the rows-before-product branch), no buckets with
# a span >= T, no buckets with a span < T (clamped), and lengths 1 and 2
POSITIONS = [(12, 4, 16), (7, 8, 32), (10, -1, 16), (9, -1, 3), (1, 4, 16), (2, 4, 16)]


def hf_case(length, buckets, max_relative, pos_att_type, padded, seed=0):
    """transformers' module on random inputs, and the same q, k, v, Pq, Pk laid out as our function takes them."""
    torch.manual_seed(seed)
    config = DebertaV2Config(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        relative_attention=True,
        pos_att_type=list(pos_att_type),
        position_buckets=buckets,
        max_relative_positions=max_relative,
        share_att_key=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    module = DisentangledSelfAttention(config).eval()
    span = buckets if buckets > 0 else max_relative
    batch = 3
    x = torch.randn(batch, length, HIDDEN)
    rel_embeddings = torch.randn(2 * span, HIDDEN)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        mask[1, length // 2 + 1 :] = 0
        mask[2, length - 1 :] = 0
    relative_pos = build_relative_position(x, x, bucket_size=buckets, max_position=max_relative)  # (1, T, T)
    with torch.no_grad():
        out, _ = module(
            x, mask[:, None, None, :] * mask[:, None, :, None], relative_pos=relative_pos, rel_embeddings=rel_embeddings
        )

        def heads(t):  # (..., N, C) -> (..., H, N, D)
            return t.unflatten(-1, (HEADS, HEAD_DIM)).transpose(-3, -2).contiguous()

        inputs = {
            "query": heads(module.query_proj(x)),
            "key": heads(module.key_proj(x)),
            "value": heads(module.value_proj(x)),
            "pos_query": heads(module.pos_query_proj(rel_embeddings)) if "p2c" in pos_att_type else None,
            "pos_key": heads(module.pos_key_proj(rel_embeddings)) if "c2p" in pos_att_type else None,
            "relative_pos": relative_pos[0],
            "span": span,
            "mask": mask if padded else None,
            "scale": 1 / math.sqrt(HEAD_DIM * (1 + len(pos_att_type))),
        }
    expected = out.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2)  # (B, H, T, D)
    return module, inputs, expected, mask.bool(), rel_embeddings


def equation(query, key, value, pos_query, pos_key, relative_pos, span, mask, scale):
    """He et al. (2021) eq. 4, indexed densely: S[i, j] = (q_i.k_j + q_i.Pk[d(i, j)] + k_j.Pq[d(i, j)]) * scale."""
    T = query.size(-2)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    assert torch.equal(relative_pos, relative_pos[(i - j).clamp(min=0), (j - i).clamp(min=0)])  # Toeplitz
    bucket = torch.clamp(relative_pos + span, 0, 2 * span - 1)  # (T, T)
    scores = torch.einsum("bhid,bhjd->bhij", query, key)
    if pos_key is not None:
        scores = scores + torch.einsum("bhid,hijd->bhij", query, pos_key[:, bucket])
    if pos_query is not None:
        scores = scores + torch.einsum("bhjd,hijd->bhij", key, pos_query[:, bucket])
    scores = scores * scale
    if mask is not None:
        real = mask.bool()
        scores = scores.masked_fill(~(real[:, None, :, None] & real[:, None, None, :]), torch.finfo(scores.dtype).min)
    return scores.softmax(-1) @ value


def run(impl, inputs, dtype=torch.float32, grad=True):
    """Output and gradients of a fixed random projection of the real query rows (padded rows carry no loss)."""
    leaves = {
        name: inputs[name].detach().to(dtype).clone().requires_grad_(grad) if inputs[name] is not None else None
        for name in ("query", "key", "value", "pos_query", "pos_key")
    }
    rest = {name: inputs[name] for name in ("relative_pos", "span", "mask", "scale")}
    out = equation(**leaves, **rest) if impl == "equation" else disentangled_attention(**leaves, **rest, impl=impl)
    grads = {}
    if grad:
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        if inputs["mask"] is not None:
            weight = weight * inputs["mask"][:, None, :, None]
        (out.double() * weight).sum().backward()
        grads = {name: leaf.grad for name, leaf in leaves.items() if leaf is not None}
    return out, grads


@pytest.mark.parametrize("pos_att_type", [BOTH, C2P, P2C], ids="|".join)
@pytest.mark.parametrize("positions", POSITIONS, ids=lambda p: f"T{p[0]}-b{p[1]}-m{p[2]}")
def test_every_path_matches_transformers_everywhere(positions, pos_att_type):
    _, inputs, expected, real, _ = hf_case(*positions, pos_att_type, padded=True)
    for impl in ("reference", "fast"):
        with torch.no_grad():
            out = disentangled_attention(**inputs, impl=impl)
        # padded query rows too: both paths mask like transformers (every key of a padded query gets the same score)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5, msg=lambda m, impl=impl: f"{impl}: {m}")


@pytest.mark.parametrize("pos_att_type", [BOTH, C2P, P2C], ids="|".join)
def test_position_bias_matches_transformers_bias(pos_att_type):
    module, inputs, _, _, rel_embeddings = hf_case(13, 4, 16, pos_att_type, padded=False)
    q, k = inputs["query"], inputs["key"]
    B, H, T, D = q.shape
    with torch.no_grad():
        theirs = module.disentangled_attention_bias(
            q.reshape(B * H, T, D),
            k.reshape(B * H, T, D),
            inputs["relative_pos"][None],
            rel_embeddings,
            1 + len(pos_att_type),
        ).view(B, H, T, T)
        ours = dis.position_bias(
            q, k, inputs["pos_query"], inputs["pos_key"], inputs["relative_pos"], inputs["span"], inputs["scale"]
        )
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True], ids=["fixed", "padded"])
@pytest.mark.parametrize("pos_att_type", [BOTH, C2P, P2C], ids="|".join)
@pytest.mark.parametrize("positions", POSITIONS[:4], ids=lambda p: f"T{p[0]}-b{p[1]}-m{p[2]}")
def test_fast_and_reference_gradients_match_the_equation_fp32(positions, pos_att_type, padded, monkeypatch):
    monkeypatch.setattr(dis, "BLOCK", 4)  # several blocks of the fast path's position products where T allows
    monkeypatch.setattr(dis, "MIN_BLOCK", 2)
    _, inputs, _, real, _ = hf_case(*positions, pos_att_type, padded)
    want_out, want = run("equation", inputs, torch.float64)
    for impl in ("reference", "fast"):
        out, grads = run(impl, inputs)
        torch.testing.assert_close(
            out[real[:, None].expand_as(out[..., 0])],
            want_out.float()[real[:, None].expand_as(out[..., 0])],
            atol=1e-5,
            rtol=1e-5,
        )
        assert grads.keys() == want.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(
                grad,
                want[name].float(),
                atol=1e-5,
                rtol=1e-4,
                msg=lambda m, impl=impl, name=name: f"{impl} d{name}: {m}",
            )


@pytest.mark.parametrize("pos_att_type", [BOTH, C2P, P2C], ids="|".join)
@pytest.mark.parametrize("positions", [POSITIONS[0], POSITIONS[2]], ids=lambda p: f"T{p[0]}-b{p[1]}-m{p[2]}")
def test_fast_bf16_error_is_bounded_by_the_references_own(positions, pos_att_type):
    _, inputs, _, real, _ = hf_case(*positions, pos_att_type, padded=True)
    exact_out, exact = run("reference", inputs, torch.float64)
    ref_out, ref = run("reference", inputs, torch.bfloat16)
    fast_out, fast = run("fast", inputs, torch.bfloat16)
    rows = real[:, None].expand_as(exact_out[..., 0])

    def error(a, b):
        return (a.double() - b).abs().max().item()

    assert error(fast_out[rows], exact_out[rows]) <= 2 * error(ref_out[rows], exact_out[rows]) + 1e-3
    for name in exact:
        scale = exact[name].abs().max().item()
        assert error(fast[name], exact[name]) <= 2 * error(ref[name], exact[name]) + 1e-3 * scale, name


@pytest.mark.parametrize("block", [2, 3, 4, 32])
@pytest.mark.parametrize("length", [1, 2, 6, 8, 9, 13])
def test_position_bias_reads_each_rows_window(length, block, monkeypatch):
    """bias[i, j] = q_i . Pk[d(i - j)] + k_j . Pq[d(i - j)], for blocks that split T and for a single block."""
    monkeypatch.setattr(dis, "BLOCK", block)
    monkeypatch.setattr(dis, "MIN_BLOCK", 2)
    torch.manual_seed(0)
    q, k, pos_q, pos_k = torch.randn(2, 3, length, 4), torch.randn(2, 3, length, 4), *torch.randn(2, 3, 6, 4)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    relative_pos = torch.randint(-3, 3, (2 * length - 1,))[i - j + length - 1]  # any Toeplitz matrix
    index = relative_pos + 3
    c2p = torch.einsum("bhid,hijd->bhij", q, pos_k[:, index]) * 0.5
    p2c = torch.einsum("bhjd,hijd->bhij", k, pos_q[:, index]) * 0.5
    torch.testing.assert_close(dis.position_bias(q, k, None, pos_k, relative_pos, 3, 0.5), c2p)
    torch.testing.assert_close(dis.position_bias(q, k, pos_q, None, relative_pos, 3, 0.5), p2c)
    torch.testing.assert_close(dis.position_bias(q, k, pos_q, pos_k, relative_pos, 3, 0.5), c2p + p2c)


@pytest.mark.parametrize(("length", "block"), [(1, 1), (2, 2), (6, 3), (8, 2), (7, 7)])
def test_write_windows_fills_every_entry_outside_the_windows_with_zeros(length, block):
    """The fast path's backward writes the gradient into uninitialised memory: nothing of it may survive."""
    width = length + block - 1
    out = torch.full((2, length // block, 3, block, width), float("nan"))
    values = torch.randn(3, 2, length // block, block, length)
    want = torch.zeros(out.shape)
    dis.shifted(want, length).copy_(values)
    torch.testing.assert_close(dis.write_windows(out, values, length), want)


def test_dropout_is_applied_on_the_fast_path():
    _, inputs, _, _, _ = hf_case(7, 8, 32, BOTH, padded=False)
    torch.manual_seed(3)
    dropped = disentangled_attention(**inputs, dropout_p=0.5, impl="fast")
    torch.manual_seed(3)
    again = disentangled_attention(**inputs, dropout_p=0.5, impl="reference")
    plain = disentangled_attention(**inputs, impl="fast")
    assert not torch.allclose(dropped, plain)
    torch.testing.assert_close(dropped, again)  # the same dropout mask on the same weights


def test_compiled_fast_path_matches_eager():
    _, inputs, _, _, _ = hf_case(11, 4, 16, BOTH, padded=True)
    compiled = torch.compile(dis.fast_attention, backend="aot_eager")  # inductor works too, but takes a minute
    leaves = ("query", "key", "value", "pos_query", "pos_key", "relative_pos", "span", "mask", "scale")
    eager_out, eager = run("fast", inputs)
    args = [
        inputs[name].clone().requires_grad_(name in leaves[:5])
        if torch.is_tensor(inputs[name]) and name != "mask"
        else inputs[name]
        for name in leaves
    ]
    out = compiled(*args)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out.double() * weight * inputs["mask"][:, None, :, None]).sum().backward()
    torch.testing.assert_close(out, eager_out)
    for position, name in enumerate(leaves[:5]):
        torch.testing.assert_close(args[position].grad, eager[name])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward_matches_on_real_rows():
    require_module("torch.nn.attention.flex_attention", "impl='flex' needs FlexAttention")
    _, inputs, expected, real, _ = hf_case(13, 4, 16, BOTH, padded=True)
    with torch.no_grad():  # FlexAttention has no CPU backward; its gradients are checked on CUDA below
        out = disentangled_attention(**inputs, impl="flex")
    rows = real[:, None].expand_as(out[..., 0])
    torch.testing.assert_close(out[rows], expected[rows], atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pos_att_type", [BOTH, C2P, P2C], ids="|".join)
def test_flex_gradients_match_on_cuda(pos_att_type):
    _, inputs, _, real, _ = hf_case(200, 256, 512, pos_att_type, padded=True)
    inputs = {name: value.cuda() if torch.is_tensor(value) else value for name, value in inputs.items()}
    want_out, want = run("reference", inputs)
    out, grads = run("flex", inputs)
    rows = real.cuda()[:, None].expand_as(out[..., 0])
    torch.testing.assert_close(out[rows], want_out[rows], atol=2e-5, rtol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want[name], atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")


def test_auto_is_fast_on_cpu(monkeypatch):
    _, inputs, _, _, _ = hf_case(7, 8, 32, BOTH, padded=False)
    taken = []
    monkeypatch.setattr(dis, "fast_attention", lambda *args: taken.append("fast") or args[0])
    disentangled_attention(**inputs)
    assert taken == ["fast"]


def test_bad_arguments_are_value_errors():
    _, inputs, _, _, _ = hf_case(7, 8, 32, BOTH, padded=False)
    with pytest.raises(ValueError, match="impl must be"):
        disentangled_attention(**inputs, impl="gather")
    with pytest.raises(ValueError, match=r"pos_(query|key) must be \(H, 2 \* span, D\)"):
        disentangled_attention(**{**inputs, "span": 4})
    with pytest.raises(ValueError, match=r"mask must be \(B, T\)"):
        disentangled_attention(**{**inputs, "mask": torch.ones(2, 7)})
    with pytest.raises(ValueError, match=r"relative_pos must be \(T, T\)"):
        disentangled_attention(**{**inputs, "relative_pos": inputs["relative_pos"][None]})


@pytest.mark.parametrize("grouped", [True, False], ids=["row-groups", "whole-batch"])
def test_packed_batch_matches_the_padded_reference(grouped, monkeypatch):
    from bunmyaku.models import fastpath

    # every row above 0 tokens may start a group of its own: lengths 12, 11 | 7 | 3 | 2
    monkeypatch.setattr(fastpath, "GROUP_MIN_LENGTH", 0 if grouped else 32)
    _, inputs, _, _, _ = hf_case(12, 4, 16, BOTH, padded=False)
    mask = torch.ones(5, 12, dtype=torch.long)
    for row, length in enumerate([12, 3, 7, 11, 2]):
        mask[row, length:] = 0
    torch.manual_seed(0)
    tensors = {name: torch.randn(5, *inputs[name].shape[1:]) for name in ("query", "key", "value")}
    tensors |= {name: inputs[name].clone() for name in ("pos_query", "pos_key")}
    packing = fastpath.Packing.from_mask(mask)
    assert (packing.groups is not None) == grouped
    rest = {"relative_pos": inputs["relative_pos"], "span": inputs["span"], "scale": inputs["scale"]}

    want_out, want = run("reference", {**tensors, **rest, "mask": mask})
    leaves = {name: t.clone().requires_grad_() for name, t in tensors.items()}

    def packed(t):  # (B, H, T, D) -> (N, H, D)
        return packing.unpad(t.transpose(1, 2).flatten(2)).unflatten(-1, t.shape[1:2] + t.shape[3:])

    out = dis.packed_disentangled_attention(
        *(packed(leaves[name]) for name in ("query", "key", "value")),
        leaves["pos_query"],
        leaves["pos_key"],
        packing=packing,
        impl="fast",
        **rest,
    )
    weight = torch.randn(want_out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out.double() * packed(weight)).sum().backward()
    torch.testing.assert_close(out, packed(want_out), atol=1e-6, rtol=1e-5)
    for name, grad in want.items():
        torch.testing.assert_close(
            leaves[name].grad, grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}"
        )
