"""Sparse attention for long inputs: a sliding window plus global tokens (Longformer, Beltagy et al. 2020 §3).

Notation: B batch, H heads, T sequence length, D head dim, w the one-sided window, d the dilation, G the most
global tokens of any row, n the number of query blocks, b the block size.

The pattern, as a boolean (T, T) matrix per row (True where query i may attend to key j)::

    allowed[i, j] = valid[j] and (global[i] or global[j] or (|i - j| <= w * d and (i - j) % d == 0))

A local query sees the keys within w dilated steps on each side and every global key; a global query sees every
key. Padding keys are never seen, and padding queries output zeros (as in ``transformers``' Longformer), or, with
``attend_from_padding`` (ModernBERT's padded batches, as ``transformers`` computes them), attend like real queries.
A query that sees no key at all outputs zeros (what SDPA gives a fully masked row).
``attention_window`` in a Longformer config is the two-sided window: w = attention_window // 2.

Each key is counted once: a global key inside a local query's window is scored in the global part, not twice.

Three computations of the same function:

- :func:`dense_reference`: the (T, T) mask above, built and applied to the full score matrix. Quadratic in T; the
  tests' oracle, never used by a model.
- the blocked CPU path (:func:`_blocked_local`): queries in blocks of b; block k's keys are the overlapping span
  [k b - w, (k + 1) b + w), taken from one strided view (``unfold``), with the G global keys in front. The n
  blocks are the batch of one ``F.scaled_dot_product_attention`` call under a (b, G + b + 2w) mask per block, so
  PyTorch's fused CPU kernel does the softmax in tiles and nothing is ever (T, T): time and memory grow linearly
  in T. Global queries attend to every key in a (G, T) call of their own. Dilation d splits the sequence into its
  d residue classes (positions i with the same i mod d only ever see each other's keys within the window), each a
  plain sliding window of w.
- the CUDA path (:func:`_flex_local`): ``torch.nn.attention.flex_attention`` with a ``BlockMask`` built from the
  same rule, so the kernel skips the blocks outside the band. Dropout on the attention weights is not a flex
  option, so training with attention dropout takes the blocked path.

Longformer computes its global queries with their own projections (``query_global`` ...): :func:`sparse_attention`
takes them as ``global_qkv``, and the global rows are overwritten with :func:`global_query_attention`'s output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class SparsePattern:
    """Who attends to whom: the sliding window, the valid (non-padding) tokens and the global tokens.

    Args:
        window: one-sided window w: a local query sees w keys (w dilated steps) on each side and itself.
        valid: (B, T) bool, True for real tokens; None when nothing is padded.
        is_global: (B, T) bool, True for global tokens (padding is never global); None when there are none.
        dilation: d, the step between the keys of a window (1: contiguous).
        attend_from_padding: padding queries attend to the real keys of their window as real queries do; False:
            they output zeros.
    """

    window: int
    valid: torch.Tensor | None = None
    is_global: torch.Tensor | None = None
    dilation: int = 1
    attend_from_padding: bool = False
    _slots: tuple[torch.Tensor, ...] | None = field(default=None, init=False, repr=False)
    _block_mask: object | None = field(default=None, init=False, repr=False)  # FlexAttention's, built once

    def __post_init__(self) -> None:
        if self.window < 0:
            raise ValueError(f"window {self.window}: expected a one-sided window >= 0")
        if self.dilation < 1:
            raise ValueError(f"dilation {self.dilation}: expected >= 1")
        if self.is_global is not None:
            self.is_global = self.is_global.bool()
            if self.valid is not None:
                self.is_global = self.is_global & self.valid.bool()
            if not bool(self.is_global.any()):
                self.is_global = None
        if self.valid is not None:
            self.valid = self.valid.bool()

    @classmethod
    def from_masks(
        cls,
        window: int,
        attention_mask: torch.Tensor | None,
        global_attention_mask: torch.Tensor | None = None,
        dilation: int = 1,
    ) -> SparsePattern:
        """From HF-style (B, T) masks: ``attention_mask`` 1 for real tokens, ``global_attention_mask`` 1 for global."""
        valid = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        is_global = None if global_attention_mask is None else global_attention_mask.bool()
        return cls(window, valid, is_global, dilation)

    def valid_or_all(self, B: int, T: int, device) -> torch.Tensor:
        """(B, T) bool validity, all True when nothing is padded."""
        if self.valid is None:
            return torch.ones(B, T, dtype=torch.bool, device=device)
        return self.valid

    def global_slots(self) -> tuple[torch.Tensor, ...]:
        """Each row's global tokens gathered into G slots (G = the most any row has).

        Returns:
            index (B, G) their positions (0 in unused slots), used (B, G) bool, and the (row, position) pairs
            (P,), (P,) of every global token with slot (P,) its slot: what scatters G-slot outputs back.
        """
        assert self.is_global is not None
        if self._slots is None:
            self._slots = self._find_global_slots()
        return self._slots

    def _find_global_slots(self) -> tuple[torch.Tensor, ...]:
        is_global = self.is_global
        B = is_global.size(0)
        counts = is_global.sum(-1)  # (B,)
        G = int(counts.max())
        rows, positions = is_global.nonzero(as_tuple=True)  # (P,) row-major, so slots count up within a row
        slot = (is_global.long().cumsum(-1) - 1)[rows, positions]  # (P,)
        index = torch.zeros(B, G, dtype=torch.long, device=is_global.device)
        index[rows, slot] = positions
        used = torch.arange(G, device=is_global.device)[None] < counts[:, None]  # (B, G)
        return index, used, rows, positions, slot


def _gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), index (B, G) -> (B, H, G, D): the rows at those positions."""
    B, H, _, D = x.shape
    return x.gather(2, index[:, None, :, None].expand(B, H, index.size(1), D))


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim in fp32 (as HF's Longformer does), back in the scores' dtype."""
    return scores.softmax(dim=-1, dtype=torch.float32).to(scores.dtype)


def _neg(dtype: torch.dtype) -> float:
    # the dtype's lowest finite value rather than -inf: a row with every key masked (a padding query) then gets
    # finite, uniform weights (zeroed afterwards) and finite gradients, where -inf would give NaN
    return torch.finfo(dtype).min


def global_query_attention(
    q_global: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Global queries attend to every valid key: (B, H, G, D) queries -> (B, H, G, D). Linear in T for fixed G.

    Args:
        q_global: (B, H, G, D) the global tokens' queries.
        k, v: (B, H, T, D) every position's keys and values.
        valid: (B, T) bool real tokens, or None.
    """
    mask = None
    if valid is not None:  # a row of padding only keeps its keys: no query of it is used, and none gives NaN
        mask = (valid | ~valid.any(-1, keepdim=True))[:, None, None, :]  # (B, 1, 1, T)
    return F.scaled_dot_product_attention(q_global, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def _blocked_local(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    key_ok: torch.Tensor,
    global_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    dropout_p: float,
    scale: float,
    block_size: int | None = None,
) -> torch.Tensor:
    """Sliding-window attention (window ``window`` each side, no dilation) plus global keys, in blocks of queries.

    Each block of b queries is one row of a batched SDPA call over its own b + 2w window keys (and the G global
    keys in front of them), under a (b, G + b + 2w) mask: PyTorch's fused CPU kernel then never forms the scores
    of more than a tile, and the mask, the largest tensor, is T x (G + b + 2w) booleans.

    Args:
        q, k, v: (B, H, T, D).
        key_ok: (B, T) bool, keys a window may contain (real, not global: global keys are scored apart).
        global_kv: (B, H, G, D) global keys and values, and (B, G) bool the slots in use; or None.
        block_size: queries per block b; default max(window, ``MIN_BLOCK``).

    Returns:
        (B, H, T, D).
    """
    B, H, T, D = q.shape
    w = window
    b = block_size or max(w, MIN_BLOCK)
    n = -(-T // b)  # blocks
    Tp = n * b
    span = b + 2 * w  # keys of one block: w before it, its b, w after it

    def key_blocks(x):  # (B, H, T, D) -> (B * n, H, span, D): block k's keys, from one strided view
        x = F.pad(x, (0, 0, w, Tp - T + w)).unfold(2, span, b)  # (B, H, n, D, span)
        return x.permute(0, 2, 1, 4, 3).reshape(B * n, H, span, D)

    q_blocks = F.pad(q, (0, 0, 0, Tp - T)).view(B, H, n, b, D).transpose(1, 2).reshape(B * n, H, b, D)
    k_blocks, v_blocks = key_blocks(k), key_blocks(v)
    ok = F.pad(key_ok, (w, Tp - T + w), value=False).unfold(1, span, b)  # (B, n, span)
    # key j of a block is at offset j - w - i from its query i: within the band when |offset| <= w
    offset = torch.arange(span, device=q.device)[None, :] - w - torch.arange(b, device=q.device)[:, None]  # (b, span)
    allowed = (offset.abs() <= w) & ok[:, :, None, :]  # (B, n, b, span)
    empty = ~allowed.any(-1)  # (B, n, b): queries that see no window key
    if global_kv is not None:
        empty = empty & ~global_kv[2].any(-1)[:, None, None]
    # a query that sees nothing sees its own position instead, so that no softmax row is empty (its output is zeroed)
    allowed = allowed | ((offset == 0) & empty[..., None])
    if global_kv is not None:
        k_global, v_global, used = global_kv
        G = k_global.size(2)

        def with_global(x_global, x_blocks):  # every block's keys get the G global keys in front
            x_global = x_global[:, None].expand(B, n, H, G, D).reshape(B * n, H, G, D)
            return torch.cat([x_global, x_blocks], dim=2)  # (B * n, H, G + span, D)

        k_blocks, v_blocks = with_global(k_global, k_blocks), with_global(v_global, v_blocks)
        allowed = torch.cat([used[:, None, None, :].expand(B, n, b, G), allowed], dim=-1)  # (B, n, b, G + span)
    out = F.scaled_dot_product_attention(
        q_blocks, k_blocks, v_blocks, attn_mask=allowed.reshape(B * n, 1, b, -1), dropout_p=dropout_p, scale=scale
    )  # (B * n, H, b, D)
    out = out.view(B, n, H, b, D).masked_fill(empty.view(B, n, 1, b, 1), 0.0)
    return out.transpose(1, 2).reshape(B, H, Tp, D)[:, :, :T]


def _dilated_local(q, k, v, window, dilation, key_ok, global_kv, dropout_p, scale, block_size=None) -> torch.Tensor:
    """Dilated sliding window: each of the d residue classes (positions i mod d) is a plain window of w over itself."""
    d = dilation
    if d == 1:
        return _blocked_local(q, k, v, window, key_ok, global_kv, dropout_p, scale, block_size)
    B, H, T, D = q.shape
    Tp = -(-T // d) * d

    def split(x):  # (B, H, Tp, D) -> (B * d, H, Tp / d, D): residue class r of row b becomes row b * d + r
        x = F.pad(x, (0, 0, 0, Tp - T))
        return x.view(B, H, Tp // d, d, D).permute(0, 3, 1, 2, 4).reshape(B * d, H, Tp // d, D)

    ok = F.pad(key_ok, (0, Tp - T), value=False).view(B, Tp // d, d).transpose(1, 2).reshape(B * d, Tp // d)
    if global_kv is not None:
        global_kv = tuple(t.repeat_interleave(d, dim=0) for t in global_kv)  # every class sees every global key
    out = _blocked_local(split(q), split(k), split(v), window, ok, global_kv, dropout_p, scale, block_size)
    out = out.view(B, d, H, Tp // d, D).permute(0, 2, 3, 1, 4).reshape(B, H, Tp, D)  # classes interleaved back
    return out[:, :, :T]


# the fewest queries per block of the CPU path: narrower blocks make many tiny matmuls (tests lower it)
MIN_BLOCK = 64
_compiled_flex = None


def _flex_local(q, k, v, pattern: SparsePattern, scale: float) -> torch.Tensor:
    """The whole pattern (global rows included, with these q, k, v) on FlexAttention: a BlockMask from the rule."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)  # fused only when compiled; lengths vary, so not static
    B, H, T, D = q.shape
    reach, d = pattern.window * pattern.dilation, pattern.dilation
    valid = pattern.valid_or_all(B, T, q.device)
    is_global = pattern.is_global if pattern.is_global is not None else torch.zeros_like(valid)

    def mask_mod(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        near = (diff.abs() <= reach) & (diff % d == 0)
        return valid[b, kv_idx] & (near | is_global[b, q_idx] | is_global[b, kv_idx])

    if pattern._block_mask is None:  # the layers that share a pattern share its block mask
        pattern._block_mask = create_block_mask(mask_mod, B, None, T, T, device=q.device)
    return _compiled_flex(q, k, v, block_mask=pattern._block_mask, scale=scale)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: SparsePattern,
    global_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    block_size: int | None = None,
    global_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sliding-window + global attention, linear in T: see the module docstring for the pattern.

    Args:
        q, k, v: (B, H, T, D).
        pattern: window, padding, global tokens, dilation.
        global_qkv: the global queries' own projections (Longformer's ``query_global`` / ``key_global`` /
            ``value_global``): (B, H, G, D) queries in :meth:`SparsePattern.global_slots` order and (B, H, T, D) keys
            and values of every position. None: global queries use ``q``, ``k``, ``v`` like the rest.
        dropout_p: dropout on the attention weights.
        scale: defaults to 1 / sqrt(D).
        block_size: queries per block of the CPU path (tests vary it).
        global_out: (B, H, G, D) the global rows, computed by the caller (instead of ``global_qkv``).

    Returns:
        (B, H, T, D); zeros at padding queries (unless ``pattern.attend_from_padding``) and at queries that see no key.
    """
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    valid = pattern.valid_or_all(B, T, q.device)
    slots = pattern.global_slots() if pattern.is_global is not None else None
    if q.is_cuda and dropout_p == 0.0:
        out = _flex_local(q, k, v, pattern, scale)
        if slots is None or (global_qkv is None and global_out is None):
            return out if pattern.attend_from_padding else out.masked_fill(~valid[:, None, :, None], 0.0)
    else:
        key_ok = valid if pattern.is_global is None else valid & ~pattern.is_global
        global_kv = None
        if slots is not None:
            index, used = slots[0], slots[1]
            global_kv = (_gather_positions(k, index), _gather_positions(v, index), used)
        out = _dilated_local(q, k, v, pattern.window, pattern.dilation, key_ok, global_kv, dropout_p, scale, block_size)
    if not pattern.attend_from_padding:
        out = out.masked_fill(~valid[:, None, :, None], 0.0)
    if slots is None:
        return out
    index, _, rows, positions, slot = slots
    if global_out is None:
        q_global, k_global, v_global = global_qkv if global_qkv is not None else (_gather_positions(q, index), k, v)
        global_out = global_query_attention(q_global, k_global, v_global, pattern.valid, dropout_p, scale)  # (B,H,G,D)
    out = out.transpose(1, 2).index_put((rows, positions), global_out.transpose(1, 2)[rows, slot])  # (B, T, H, D)
    return out.transpose(1, 2)


def dense_mask(pattern: SparsePattern, B: int, T: int, device=None) -> torch.Tensor:
    """The pattern as a (B, T, T) bool matrix, True where query i may attend to key j: quadratic, for tests."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    diff = i - j
    near = (diff.abs() <= pattern.window * pattern.dilation) & (diff % pattern.dilation == 0)  # (T, T)
    valid = pattern.valid_or_all(B, T, device)
    allowed = near[None].expand(B, T, T)
    if pattern.is_global is not None:
        allowed = allowed | pattern.is_global[:, :, None] | pattern.is_global[:, None, :]
    return allowed & valid[:, None, :]


def dense_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: SparsePattern,
    global_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`sparse_attention` the plain way: full (B, H, T, T) scores under :func:`dense_mask`. Tests only."""
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    allowed = dense_mask(pattern, B, T, q.device)[:, None]  # (B, 1, T, T)
    scores = (q @ k.transpose(-2, -1) * scale).masked_fill(~allowed, _neg(q.dtype))
    out = (_softmax(scores) @ v).masked_fill(~allowed.any(-1, keepdim=True), 0.0)  # (B, H, T, D)
    if global_qkv is not None and pattern.is_global is not None:
        q_global, k_global, v_global = global_qkv
        for b, t in pattern.is_global.nonzero().tolist():
            slot = int(pattern.is_global[b, :t].sum())
            s = q_global[b, :, slot, None] @ k_global[b].transpose(-2, -1) * scale  # (H, 1, T)
            s = s.masked_fill(~pattern.valid_or_all(B, T, q.device)[b][None, None], _neg(q.dtype))
            out[b, :, t] = (_softmax(s) @ v_global[b])[:, 0]
    if pattern.attend_from_padding:
        return out
    return out.masked_fill(~pattern.valid_or_all(B, T, q.device)[:, None, :, None], 0.0)
