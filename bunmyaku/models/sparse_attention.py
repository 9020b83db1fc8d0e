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
- the blocked CPU path (:func:`_blocked_local`): queries in blocks of b; block k's keys are the overlapping
  span [k b - w, (k + 1) b + w), with the G global keys in front, gathered by one ``cat`` in the projections' own
  (B, T, H, D) layout: a span of whole blocks (2w a multiple of b, as the default b = w gives for w >= 64) from
  shifted views of the blocked sequence, another from one strided view (``unfold``, whose backward is slower). The
  n blocks are the batch of one ``F.scaled_dot_product_attention`` call under a (b, G + b + 2w) mask per block, so
  PyTorch's fused CPU kernel does the softmax in tiles and nothing is ever (T, T): time and memory grow linearly
  in T. Global queries attend to every key in a (G, T) call of their own. Dilation d splits the sequence into its
  d residue classes (positions i with the same i mod d only ever see each other's keys within the window), each a
  plain sliding window of w. (FlexAttention on CPU, tried instead, computed the forward no faster after a long
  compile, and has no backward on CPU in torch 2.13.)
- the CUDA path (:func:`_flex_local`): ``torch.nn.attention.flex_attention`` with a ``BlockMask`` built from the
  same rule, so the kernel skips the blocks outside the band. Dropout on the attention weights is not a flex
  option, so training with attention dropout takes the blocked path. The tests also run this route on the CPU
  (``FLEX_DEVICES``; eager FlexAttention, forward only), against the dense reference and ``transformers``.

Longformer computes its global queries with their own projections (``query_global`` ...): :func:`sparse_attention`
takes them as ``global_qkv``, and the global rows are overwritten with :func:`global_query_attention`'s output.

The second pattern, BigBird's block-sparse one (:class:`BlockSparsePattern`: global first and last blocks, a window
of three blocks, r random blocks), runs on the same machinery: :func:`block_sparse_attention` gathers each query
block's key blocks into one batched SDPA call on CPU (linear in T) and uses a FlexAttention ``BlockMask`` on CUDA;
:func:`block_sparse_reference` is its dense (T, T) oracle for the tests. Its random blocks are drawn in training
(:meth:`BlockSparsePattern.redrawn`, under :func:`random_block_choices`) and fixed to block 0 in eval mode
(:meth:`BlockSparsePattern.eval_mode`), both as ``transformers`` has them.
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

    def seq_major(x, front, back):  # (B, H, T, D) -> (B, front + T + back, H, D): the projections' own layout
        x = x.transpose(1, 2)
        return F.pad(x, (0, 0, 0, 0, front, back)) if front or back else x

    def key_blocks(x, x_global):  # (B, H, T, D) -> (B * n, H, G + span, D): block k's keys, global ones in front
        x = seq_major(x, w, Tp - T + w)  # (B, Tp + 2w, H, D)
        if 2 * w % b == 0:  # the span is whole blocks: m shifted views of the blocked sequence
            m = span // b
            blocked = x.reshape(B, n + m - 1, b, H, D)
            parts = [blocked[:, j : j + n] for j in range(m)]  # m x (B, n, b, H, D)
        else:  # overlapping windows of one strided view
            parts = [x.unfold(1, span, b).permute(0, 1, 4, 2, 3)]  # (B, n, span, H, D)
        if x_global is not None:
            parts.insert(0, x_global.transpose(1, 2)[:, None].expand(B, n, -1, H, D))  # (B, n, G, H, D)
        x = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0].contiguous()  # (B, n, G + span, H, D)
        return x.view(B * n, -1, H, D).transpose(1, 2)

    q_blocks = seq_major(q, 0, Tp - T).reshape(B * n, b, H, D).transpose(1, 2)  # (B * n, H, b, D)
    k_global, v_global, used = global_kv if global_kv is not None else (None, None, None)
    k_blocks, v_blocks = key_blocks(k, k_global), key_blocks(v, v_global)  # (B * n, H, G + span, D)
    ok = F.pad(key_ok, (w, Tp - T + w), value=False).unfold(1, span, b)  # (B, n, span)
    # key j of a block is at offset j - w - i from its query i: within the band when |offset| <= w
    offset = torch.arange(span, device=q.device)[None, :] - w - torch.arange(b, device=q.device)[:, None]  # (b, span)
    allowed = (offset.abs() <= w) & ok[:, :, None, :]  # (B, n, b, span)
    empty = ~allowed.any(-1)  # (B, n, b): queries that see no window key
    if used is not None:
        empty = empty & ~used.any(-1)[:, None, None]
    # a query that sees nothing sees its own position instead, so that no softmax row is empty (its output is zeroed)
    allowed = allowed | ((offset == 0) & empty[..., None])
    if used is not None:
        allowed = torch.cat([used[:, None, None, :].expand(B, n, b, -1), allowed], dim=-1)  # (B, n, b, G + span)
    out = F.scaled_dot_product_attention(
        q_blocks, k_blocks, v_blocks, attn_mask=allowed.view(B * n, 1, b, -1), dropout_p=dropout_p, scale=scale
    )  # (B * n, H, b, D)
    out = out.transpose(1, 2).reshape(B, Tp, H, D)  # the sequence-major layout the caller merges heads in
    if bool(empty.any()):
        out = out.masked_fill(empty.view(B, Tp, 1, 1), 0.0)
    return out[:, :T].transpose(1, 2)  # (B, H, T, D)


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


# the devices whose attention runs on FlexAttention (tests add "cpu": there its eager forward runs the CUDA path's
# masks and score terms, so their logic is checked without a GPU)
FLEX_DEVICES: tuple[str, ...] = ("cuda",)


def use_flex(q: torch.Tensor, dropout_p: float) -> bool:
    """Whether attention on ``q`` takes FlexAttention (DeBERTa's disentangled attention asks too)."""
    return q.device.type in FLEX_DEVICES and dropout_p == 0.0  # dropout on the weights is not a flex option


def _flex(q, k, v, **kwargs) -> torch.Tensor:
    """FlexAttention: compiled once per process on CUDA (fused only when compiled; lengths vary, so not static),
    eager elsewhere (forward only, a dense (B, H, T, T) reference: the tests' run of the CUDA path on a CPU)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if not q.is_cuda:
        return flex_attention(q, k, v, **kwargs)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex(q, k, v, **kwargs)


def _flex_local(q, k, v, pattern: SparsePattern, scale: float) -> torch.Tensor:
    """The whole pattern (global rows included, with these q, k, v) on FlexAttention: a BlockMask from the rule."""
    from torch.nn.attention.flex_attention import create_block_mask

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
    return _flex(q, k, v, block_mask=pattern._block_mask, scale=scale)


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
    if use_flex(q, dropout_p):
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
        out = out.transpose(1, 2).masked_fill(~valid[:, :, None, None], 0.0).transpose(1, 2)  # layout kept
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


@dataclass
class BlockSparsePattern:
    """BigBird's block-sparse pattern (Zaheer et al. 2020 §2, ITC): the sequence in n blocks of b tokens (the last
    one padded), then

    - the first and the last block are global: their queries see every key, and every query sees their keys;
    - every other query block i sees the blocks i - 1, i, i + 1 (the window) and r random key blocks.

    A key block listed twice for a query block (a random block that is also global or in the window, or listed twice
    among the random ones) has its keys in that block's softmax twice, as in ``transformers``, which concatenates the
    listed blocks; the window blocks that coincide with a global block (block 0 for i = 1, block n - 1 for i = n - 2)
    are counted once, as there.

    Args:
        block_size: b.
        random_blocks: (H or 1, n - 2, r) long, the random key blocks of query blocks 1 .. n - 2 (``transformers``'
            ``rand_attn`` layout); 1 on the first dim when every head has the same.
        valid: (B, T) bool, True for real tokens; None when nothing is padded.
    """

    block_size: int
    random_blocks: torch.Tensor
    valid: torch.Tensor | None = None
    _block_mask: object | None = field(default=None, init=False, repr=False)  # FlexAttention's, built once

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size {self.block_size}: expected >= 1")
        if self.random_blocks.dim() != 3:
            raise ValueError(
                f"random_blocks of shape {tuple(self.random_blocks.shape)}: expected (heads or 1, blocks - 2, r)"
            )
        if self.valid is not None:
            self.valid = self.valid.bool()

    valid_or_all = SparsePattern.valid_or_all

    @classmethod
    def eval_mode(
        cls,
        block_size: int,
        num_random_blocks: int,
        length: int,
        attention_mask: torch.Tensor | None = None,
        device=None,
    ) -> BlockSparsePattern:
        """``transformers``' pattern in eval mode, where it draws no random block: its adjacency list stays all
        zeros, so each of a query block's r random blocks is block 0.

        Args:
            attention_mask: (B, T) 1 for real tokens, or None.
            device: where the random blocks live (and :meth:`redrawn` draws); default: the mask's, else the CPU.
        """
        n = -(-length // block_size)
        device = attention_mask.device if attention_mask is not None else device
        random_blocks = torch.zeros(1, max(n - 2, 0), num_random_blocks, dtype=torch.long, device=device)
        valid = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        return cls(block_size, random_blocks, valid)

    def redrawn(self, num_heads: int, max_seq_len: int | None = None) -> BlockSparsePattern:
        """The same blocks and padding with a fresh draw of random blocks, as in training: for every head and middle
        query block, r distinct key blocks picked uniformly from those :func:`random_block_choices` allows, with
        torch's generator on the device of ``random_blocks`` (so ``torch.manual_seed`` repeats a run).

        Args:
            num_heads: H; each head draws its own blocks, as in ``transformers``.
            max_seq_len: the model's longest input (``transformers``' older rule at 1024, 3072, 4096 tokens reads it).

        Raises:
            ValueError: a length the rule cannot draw r distinct random blocks for (``transformers`` fails there too).
        """
        _, middle, r = self.random_blocks.shape
        choices = random_block_choices(middle + 2, self.block_size, r, max_seq_len)  # (n - 2, m), on the host
        short = choices.sum(-1) < r
        if bool(short.any()):
            raise ValueError(
                f"{middle + 2} blocks of {self.block_size}: query block {int(short.nonzero()[0]) + 1} has fewer than "
                f"num_random_blocks={r} blocks to draw from"
            )
        device = self.random_blocks.device
        choices = choices.to(device)
        # the r largest of uniform keys over the allowed blocks: a uniform r-subset, each block at most once
        keys = torch.rand(num_heads, *choices.shape, device=device).masked_fill(~choices, -1.0)  # (H, n - 2, m)
        return type(self)(self.block_size, keys.topk(r, dim=-1).indices, self.valid)  # (H, n - 2, r) random blocks

    def key_blocks(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """What each middle query block attends: (H or 1, n - 2, 5 + r) key block ids (the first block, the window
        i - 1, i, i + 1, the last block, then the random ones) and (n - 2, 5 + r) bool, False for a window slot that
        repeats a global block."""
        random_blocks = self.random_blocks.to(device)
        if random_blocks.size(1) != n - 2:
            raise ValueError(
                f"random_blocks lists {random_blocks.size(1)} query blocks; a sequence of {n} blocks of "
                f"{self.block_size} has {n - 2} between its two global blocks"
            )
        if random_blocks.numel() and (random_blocks.min() < 0 or random_blocks.max() >= n):
            raise ValueError(f"random_blocks holds a block id outside 0 .. {n - 1}")
        i = torch.arange(1, n - 1, device=device)  # (n - 2,) the middle query blocks
        fixed = torch.stack([torch.zeros_like(i), i - 1, i, i + 1, torch.full_like(i, n - 1)], dim=-1)  # (n - 2, 5)
        index = torch.cat([fixed.expand(random_blocks.size(0), n - 2, 5), random_blocks], dim=-1)
        slot_ok = torch.ones(n - 2, index.size(-1), dtype=torch.bool, device=device)
        slot_ok[:, 1] = i - 1 != 0  # block 0 is already the first slot
        slot_ok[:, 3] = i + 1 != n - 1  # block n - 1 is already the fifth
        return index, slot_ok


def random_block_choices(
    n: int, block_size: int, num_random_blocks: int, max_seq_len: int | None = None
) -> torch.Tensor:
    """Which key blocks each middle query block may draw as a random block in training: ``transformers``' rule
    (the original BigBird code's), as a (n - 2, m) bool matrix, row i - 1 for query block i, column j for key block j
    (m: one past the highest block any row may draw).

    Past the full-attention limit (n > 2r + 5 blocks) ``transformers`` follows its "plan": every query block draws
    from the first 2r + 5 blocks only, never block 0 nor block 2r + 4 (the plan's "global" ends), nor its own window
    i - 1, i, i + 1; query block 1 never draws block 2r + 3, and query block 2r + 3 never draws block 1.

    At a padded length of 1024, 3072 or 4096 tokens it keeps the paper's older rule, laid out for the model's longest
    input (n' = max_seq_len / b blocks): blocks 1 .. min(L, n' - 2), L = 1024 / b - 1 (n' - 1 when b >= 512), minus
    the window, except that query blocks n' - 3 and n' - 2 draw from the whole range, their window included.

    Raises:
        ValueError: n <= 2r + 5 at another length (``transformers`` attends fully there).
    """
    r = num_random_blocks
    i = torch.arange(1, n - 1)[:, None]  # (n - 2, 1) query blocks
    if n * block_size in (1024, 3072, 4096):
        n_max = (max_seq_len if max_seq_len is not None else n * block_size) // block_size
        last = 1024 // block_size - 1 if 1024 > 2 * block_size else n_max - 1
        j = torch.arange(min(last, n_max - 2) + 1)[None, :]  # (1, m)
        outside_window = (j < i - 1) | (j > i + 1)
        return (j >= 1) & (outside_window | (i == n_max - 3) | (i == n_max - 2))
    if n <= 2 * r + 5:
        raise ValueError(
            f"{n} blocks with num_random_blocks={r}: random blocks are drawn past 2r + 5 = {2 * r + 5} blocks only "
            "(below that the model attends fully)"
        )
    j = torch.arange(2 * r + 4)[None, :]  # (1, m): blocks 0 .. 2r + 3
    allowed = (j >= 1) & ((j < i - 1) | (j > i + 1))
    allowed &= ~((i == 1) & (j == 2 * r + 3)) & ~((i == 2 * r + 3) & (j == 1))
    return allowed


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockSparsePattern,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """BigBird's block-sparse attention, linear in T: see :class:`BlockSparsePattern` for the pattern.

    CPU (and training with attention dropout): the two global query blocks attend to every key in one (2b, T) SDPA
    call; each middle query block's key blocks (at most 5 + r) are gathered, each block once, and the n - 2 blocks of
    every head are the batch of one more SDPA call, under a key mask per block; a block listed c times gets a score
    bias of log c (the softmax of its keys counted c times; under dropout its weight is then dropped as one). Nothing
    is (T, T). CUDA: FlexAttention with a BlockMask and the same bias (:func:`_flex_block_sparse`).

    Args:
        q, k, v: (B, H, T, D).
        pattern: block size, random blocks, padding.
        dropout_p: dropout on the attention weights.
        scale: defaults to 1 / sqrt(D).

    Returns:
        (B, H, T, D). A padding query attends as a real one does (its outputs are the caller's to ignore).

    Raises:
        ValueError: fewer than 3 blocks, or random blocks that do not fit the length.
    """
    B, H, T, D = q.shape
    b = pattern.block_size
    n = -(-T // b)  # blocks
    if n < 3:
        raise ValueError(f"{T} tokens in blocks of {b}: block-sparse attention needs at least 3 blocks")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    index, slot_ok = pattern.key_blocks(n, q.device)  # (H' , n - 2, S), (n - 2, S)
    if index.size(0) not in (1, H):
        raise ValueError(f"random_blocks for {index.size(0)} heads; the attention has {H}")
    if use_flex(q, dropout_p):
        return _flex_block_sparse(q, k, v, pattern, index, slot_ok, scale)
    index, counts = _merge_repeats(index, slot_ok)  # (H', n - 2, S) each
    Tp, S = n * b, index.size(-1)
    key_ok = F.pad(pattern.valid_or_all(B, T, q.device), (0, Tp - T), value=False)  # (B, Tp)
    if Tp > T:
        q, k, v = (F.pad(t, (0, 0, 0, Tp - T)) for t in (q, k, v))  # (B, H, Tp, D)
    # the first and the last query block: every key
    q_global = torch.cat([q[:, :, :b], q[:, :, -b:]], dim=2)  # (B, H, 2b, D)
    out_global = F.scaled_dot_product_attention(
        q_global, k, v, attn_mask=key_ok[:, None, None, :], dropout_p=dropout_p, scale=scale
    )  # (B, H, 2b, D)
    # the middle query blocks: their key blocks gathered, heads x blocks as one batch of attention problems
    if index.size(0) == 1:
        k_mid, v_mid = (t.view(B, H, n, b, D).index_select(2, index.flatten()) for t in (k, v))
    else:
        heads = torch.arange(H, device=q.device)[:, None, None]
        k_mid, v_mid = (t.view(B, H, n, b, D)[:, heads, index] for t in (k, v))
    k_mid, v_mid = (t.reshape(B, H * (n - 2), S * b, D) for t in (k_mid, v_mid))  # views of the gathered copies
    q_mid = q.view(B, H, n, b, D)[:, :, 1:-1].reshape(B, H * (n - 2), b, D)
    mask = key_ok.view(B, n, b)[:, index] & (counts > 0)[None, ..., None]  # (B, H', n - 2, S, b)
    if bool((counts > 1).any()):  # a block listed c times: its keys' weights times c, a score bias of log c
        bias = counts.clamp_min(1).log().to(q.dtype)[None, ..., None]  # (1, H', n - 2, S, 1)
        mask = torch.where(mask, bias, _neg(q.dtype))  # (B, H', n - 2, S, b) float
    mask = mask.view(B, -1, n - 2, S * b).expand(B, H, n - 2, S * b).reshape(B, H * (n - 2), 1, S * b)
    out_mid = F.scaled_dot_product_attention(q_mid, k_mid, v_mid, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    out = torch.cat([out_global[:, :, :b], out_mid.view(B, H, (n - 2) * b, D), out_global[:, :, b:]], dim=2)
    return out[:, :, :T]


def _merge_repeats(index: torch.Tensor, slot_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each listed key block once per query block, with the times it is listed: (H', n - 2, S') block ids and
    (H', n - 2, S') counts (0: an unused slot). Slots no query block uses are dropped, so eval mode's r copies of
    block 0 cost one block, not r."""
    S = index.size(-1)
    listed = slot_ok.expand_as(index)  # (H', n - 2, S)
    same = (index[..., :, None] == index[..., None, :]) & listed[..., None, :]  # (H', n - 2, S, S): j' lists j's block
    earlier = torch.ones(S, S, dtype=torch.bool, device=index.device).tril(-1)  # j' < j
    first = listed & ~(same & earlier).any(-1)  # the first slot that lists each block
    counts = same.sum(-1) * first  # (H', n - 2, S)
    keep = counts.flatten(0, 1).any(0)  # (S,)
    return index[..., keep], counts[..., keep]


def block_counts(pattern: BlockSparsePattern, n: int, device=None) -> torch.Tensor:
    """(H or 1, n, n) float: how many times query block i lists key block j (0: not attended)."""
    index, slot_ok = pattern.key_blocks(n, device)
    Hr = index.size(0)
    counts = torch.ones(Hr, n, n, device=device)  # the global query blocks: every key block once
    middle = torch.zeros(Hr, n - 2, n, device=device)
    middle.scatter_add_(2, index, slot_ok.expand_as(index).float())
    counts[:, 1:-1] = middle
    return counts


def _flex_block_sparse(q, k, v, pattern: BlockSparsePattern, index, slot_ok, scale: float) -> torch.Tensor:
    """The block-sparse pattern on FlexAttention: a BlockMask of the listed blocks, and log(times listed) added to
    a score, which is the softmax of a key counted that many times."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, H, T, D = q.shape
    b = pattern.block_size
    n = -(-T // b)
    log_counts = block_counts(pattern, n, q.device).log()  # (H', n, n): -inf where not listed
    per_head = log_counts.size(0) > 1
    valid = pattern.valid_or_all(B, T, q.device)

    def mask_mod(batch, h, q_idx, kv_idx):
        head = h if per_head else 0
        return valid[batch, kv_idx] & (log_counts[head, q_idx // b, kv_idx // b] > float("-inf"))

    def score_mod(score, batch, h, q_idx, kv_idx):
        head = h if per_head else 0
        return score + log_counts[head, q_idx // b, kv_idx // b]

    if pattern._block_mask is None:  # the layers that share a pattern share its block mask
        pattern._block_mask = create_block_mask(mask_mod, B, H if per_head else None, T, T, device=q.device)
    return _flex(q, k, v, score_mod=score_mod, block_mask=pattern._block_mask, scale=scale)


def block_sparse_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern, scale: float | None = None
) -> torch.Tensor:
    """:func:`block_sparse_attention` the plain way: (B, H, T, T) scores plus log(times listed), padding keys masked.
    Quadratic in T; tests only."""
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    n = -(-T // pattern.block_size)
    block = torch.arange(T, device=q.device) // pattern.block_size  # (T,)
    counts = block_counts(pattern, n, q.device)[:, block[:, None], block[None, :]]  # (H', T, T)
    allowed = (counts > 0)[None] & pattern.valid_or_all(B, T, q.device)[:, None, None, :]  # (B, H', T, T)
    scores = q @ k.transpose(-2, -1) * scale + counts.clamp_min(1).log()  # (B, H, T, T)
    return _softmax(scores.masked_fill(~allowed, _neg(q.dtype))) @ v
