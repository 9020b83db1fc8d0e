"""Sliding-window + global attention: the linear paths equal a dense masked softmax, and memory stays linear."""

from __future__ import annotations

import math

import pytest
import torch

from bunmyaku.models import sparse_attention as sa
from bunmyaku.models.sparse_attention import SparsePattern, dense_reference, sparse_attention


def _qkv(B, H, T, D, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).requires_grad_(requires_grad) for _ in "qkv"]


def _masks(B, T, lengths, global_positions):
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        valid[b, :n] = True
    is_global = torch.zeros(B, T, dtype=torch.bool)
    for b, positions in enumerate(global_positions):
        is_global[b, positions] = True
    return valid, is_global


def _written_out(q, k, v, window, dilation, valid, is_global):
    """The pattern as loops over (i, j): the rule of the module docstring, independent of its tensor code."""
    B, H, T, D = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for i in range(T):
            if not valid[b, i]:
                continue
            keys = [
                j
                for j in range(T)
                if valid[b, j]
                and (
                    is_global[b, i] or is_global[b, j] or (abs(i - j) <= window * dilation and (i - j) % dilation == 0)
                )
            ]
            s = q[b, :, i, None] @ k[b, :, keys].transpose(-2, -1) / math.sqrt(D)  # (H, 1, len(keys))
            out[b, :, i] = (s.softmax(-1) @ v[b, :, keys])[:, 0]
    return out


def test_dense_reference_is_the_rule_written_out():
    q, k, v = _qkv(2, 2, 11, 4, seed=0)
    valid, is_global = _masks(2, 11, [11, 8], [[0, 5], [2]])
    for window, dilation in [(2, 1), (1, 3)]:
        pattern = SparsePattern(window, valid, is_global, dilation)
        torch.testing.assert_close(
            dense_reference(q, k, v, pattern), _written_out(q, k, v, window, dilation, valid, is_global)
        )


CASES = [
    # T, window (one-sided), dilation, lengths, global positions, block size
    (13, 2, 1, [13, 9], [[], []], None),
    (37, 4, 1, [37, 30], [[0], [0]], 8),
    (50, 3, 1, [50, 21], [[0, 7, 49], [3]], 5),  # uneven global counts, a global token at the last position
    (29, 8, 1, [29, 29, 4], [[1], [], [0, 3]], 16),  # a window wider than a block, a row with no global token
    (41, 2, 3, [41, 33], [[0], [10, 11]], 4),  # dilation: 3 residue classes
    (70, 5, 2, [70, 61], [[], [60]], None),
]


@pytest.mark.parametrize("T, window, dilation, lengths, global_positions, block_size", CASES)
def test_sparse_equals_dense_reference_outputs_and_gradients(
    T, window, dilation, lengths, global_positions, block_size
):  # noqa: E501
    B = len(lengths)
    valid, is_global = _masks(B, T, lengths, global_positions)
    pattern = SparsePattern(window, valid, is_global, dilation)
    q, k, v = _qkv(B, 3, T, 8, seed=T, requires_grad=True)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = sparse_attention(q, k, v, pattern, block_size=block_size)
    expected = dense_reference(q2, k2, v2, pattern)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (expected * grad).sum().backward()
    for ours, theirs in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-5)
    assert out.transpose(1, 2)[~valid].abs().max() == 0  # padding queries output zeros


@pytest.mark.parametrize("window, block_size", [(4, 8), (3, 5)])  # key spans of whole blocks; overlapping windows
def test_projection_layout_inputs(window, block_size):
    """q, k, v as models hand them over, (B, H, T, D) views of (B, T, H, D) projections: the same outputs and
    gradients as the dense reference, and an output that is again such a view (heads merge without a copy)."""
    B, T, H, D = 2, 45, 3, 8
    valid, is_global = _masks(B, T, [45, 38], [[0], [4, 20]])
    pattern = SparsePattern(window, valid, is_global)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, T, H, D, generator=g).transpose(1, 2).requires_grad_() for _ in "qkv")
    q2, k2, v2 = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    out = sparse_attention(q, k, v, pattern, block_size=block_size)
    expected = dense_reference(q2, k2, v2, pattern)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out.transpose(1, 2).is_contiguous()
    grad = torch.randn_like(expected)
    (out * grad).sum().backward()
    (expected * grad).sum().backward()
    for ours, theirs in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-5)


def test_global_queries_with_their_own_projections():
    T, B, H, D = 23, 2, 2, 4
    valid, is_global = _masks(B, T, [23, 15], [[0, 1, 2], [14]])
    pattern = SparsePattern(3, valid, is_global)
    q, k, v = _qkv(B, H, T, D, seed=1)
    g = torch.Generator().manual_seed(2)
    q_global = torch.randn(B, H, 3, D, generator=g)  # slot order: row 0 positions 0, 1, 2; row 1 position 14
    k_global, v_global = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    out = sparse_attention(q, k, v, pattern, global_qkv=(q_global, k_global, v_global))
    expected = dense_reference(q, k, v, pattern, global_qkv=(q_global, k_global, v_global))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # row 1's global token (position 14) attends to the 15 real keys with the global projections, by hand
    s = q_global[1, :, 0, None] @ k_global[1, :, :15].transpose(-2, -1) / math.sqrt(D)  # (H, 1, 15)
    torch.testing.assert_close(out[1, :, 14], (s.softmax(-1) @ v_global[1, :, :15])[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [7, 19, 33])
def test_window_covering_the_sequence_is_plain_dense_attention(T):
    q, k, v = _qkv(2, 4, T, 8, seed=3)
    attention_mask = torch.ones(2, T, dtype=torch.long)
    attention_mask[1, T - 3 :] = 0
    pattern = SparsePattern.from_masks(T, attention_mask)  # w = T: every key of every query is in the window
    out = sparse_attention(q, k, v, pattern, block_size=8)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attention_mask.bool()[:, None, None, :]
    )
    real = attention_mask.bool()
    torch.testing.assert_close(out.transpose(1, 2)[real], expected.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)


def largest_tensor_mode():
    """A dispatch mode whose ``most`` is the most elements of any tensor created while it is active."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.most = max(self.most, t.numel())
            return out

    return Largest()


def _largest_intermediate(T, window, n_global):
    """The most elements of any tensor the CPU path creates (forward and backward)."""
    q, k, v = (torch.randn(1, 1, T, 4, requires_grad=True) for _ in "qkv")
    is_global = torch.zeros(1, T, dtype=torch.bool)
    is_global[0, :n_global] = True
    with largest_tensor_mode() as mode:
        sparse_attention(q, k, v, SparsePattern(window, None, is_global), block_size=window).sum().backward()
    return mode.most


def test_memory_is_linear_in_length():
    window, n_global = 16, 2
    small, large = _largest_intermediate(512, window, n_global), _largest_intermediate(4096, window, n_global)
    assert large <= 8.5 * small  # 8x the tokens: about 8x the largest tensor, never the 64x of (T, T) scores
    assert large <= 4096 * (3 * window + n_global) * 1.01  # bounded by T x (block + both window halves + globals)
    assert large < 4096 * 4096 // 16


def test_bad_patterns_are_refused():
    with pytest.raises(ValueError, match="window -1"):
        SparsePattern(-1)
    with pytest.raises(ValueError, match="dilation 0"):
        SparsePattern(2, dilation=0)


def test_padding_is_never_global():
    pattern = SparsePattern.from_masks(2, torch.tensor([[1, 1, 0]]), torch.tensor([[0, 0, 1]]))
    assert pattern.is_global is None  # the only global token was padding


@pytest.mark.parametrize("T, window, dilation", [(300, 32, 1), (200, 16, 2), (130, 8, 3)])
def test_flex_route_equals_dense_reference_on_cpu(T, window, dilation, flex_on_cpu):
    """The CUDA route (a BlockMask from the rule, FlexAttention) run eagerly on the CPU: the same rows as the dense
    reference, global tokens and padding included."""
    B = 2
    valid, is_global = _masks(B, T, [T, T - 37], [[0, 5], [1]])
    q, k, v = _qkv(B, 4, T, 16, seed=3)
    with torch.no_grad():
        out = sparse_attention(q, k, v, SparsePattern(window, valid, is_global, dilation))
        expected = dense_reference(q, k, v, SparsePattern(window, valid, is_global, dilation))
    assert flex_on_cpu == ["sparse"]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T, window, dilation", [(300, 32, 1), (1000, 64, 2), (4096, 256, 1)])
def test_flex_attention_equals_dense_reference_on_cuda(T, window, dilation):
    B = 2
    valid, is_global = _masks(B, T, [T, T - 37], [[0, 5], [1]])
    pattern = SparsePattern(window, valid.cuda(), is_global.cuda(), dilation)
    q, k, v = (t.cuda() for t in _qkv(B, 4, T, 64, seed=0))
    out = sparse_attention(q, k, v, pattern)
    assert sa._compiled_flex is not None  # the flex path ran
    torch.testing.assert_close(out, dense_reference(q, k, v, pattern), atol=2e-4, rtol=2e-4)
