"""Attention, positions, masks and the KV cache shared by every architecture.

Notation: B batch, T query length, S key length, C model width, H query heads, K key/value heads
(K < H is grouped-query attention, K == H is multi-head attention), D head dim.

Attention is a soft dictionary look-up: each query scores every key, the scores become weights
with a softmax, and the output is the weighted sum of the values::

    Attention(Q, K, V) = softmax(Q K^T / sqrt(D) + mask) V

``eager_attention`` is that equation written out, the reference the tests compare against;
``F.scaled_dot_product_attention`` computes the same thing with fused kernels and is the default.
Masks are boolean, ``True`` where a query may attend to a key.

Two fast paths sit behind the same modules: a :class:`Packing` lets an encoder run on its real tokens
only, (N, C) instead of (B, T, C), and a :class:`StaticKVCache` decodes without growing tensors.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bunmyaku.models.linear import Linear, linear

try:
    from torch.nn.attention.varlen import varlen_attn

    # the keyword set grew across torch releases (2.10 has neither ``scale`` nor ``enable_gqa``)
    _VARLEN_KWARGS = frozenset(inspect.signature(varlen_attn).parameters)
except ImportError:  # torch without variable-length flash attention: packed batches re-pad for attention
    varlen_attn = None
    _VARLEN_KWARGS = frozenset()


class _FlashVarlenDropout(torch.autograd.Function):
    """Flash attention over packed rows *with* dropout on the attention weights (training).

    ``varlen_attn`` fixes dropout at 0, so it only serves inference; training with BERT's attention dropout would
    otherwise re-pad every layer. This calls the same flash kernel through its aten op, which draws the dropout
    mask from a Philox state it returns; backward hands that state back, so the gradient sees the same mask.
    The 3rd and 4th outputs are (rng_state, unused) on recent torch and (seed, offset) on older releases: both
    are passed back positionally, as the backward op expects them.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen: int, dropout_p: float, scale: float | None):
        out, lse, rng_a, rng_b, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, False, False, scale=scale
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_a, rng_b)
        ctx.max_seqlen, ctx.dropout_p, ctx.scale = max_seqlen, dropout_p, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu, rng_a, rng_b = ctx.saved_tensors
        n = ctx.max_seqlen
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu, cu, n, n, ctx.dropout_p, False, rng_a, rng_b, scale=ctx.scale
        )
        return dq, dk, dv, None, None, None, None


def varlen_dropout_attention(q, k, v, cu_seqlens, max_seqlen: int, dropout_p: float, scale: float | None = None):
    """Bidirectional attention within each packed row, dropout ``dropout_p`` on its weights (CUDA, fp16/bf16).

    q, k, v: (N, H, D) packed rows; ``cu_seqlens`` (B + 1,) int32 row offsets. Returns (N, H, D).
    """
    return _FlashVarlenDropout.apply(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale)


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(QK^T * scale + mask) V, the talk's equations, step by step.

    Args:
        q: (B, H, T, D) queries.
        k: (B, K, S, D) keys; H must be a multiple of K.
        v: (B, K, S, D) values.
        mask: bool, broadcastable to (B, H, T, S); True where attending is allowed.
        is_causal: mask out keys after each query (T == S, no cache).
        dropout_p: dropout on the attention weights.
        scale: defaults to 1 / sqrt(D).

    Returns:
        (B, H, T, D)
    """
    if k.size(1) != q.size(1):  # grouped-query attention: each K/V head serves H / K query heads
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if is_causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """The same computation as :func:`eager_attention` on PyTorch's fused kernels."""
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=is_causal,
        dropout_p=dropout_p,
        scale=scale,
        enable_gqa=k.size(1) != q.size(1),
    )


ATTENTION_FUNCTIONS = {"sdpa": sdpa_attention, "eager": eager_attention}


# ----------------------------------------------------------------------------------------------
# Masks


def padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) with 1 for real tokens -> bool (B, 1, 1, S), or ``None`` when nothing is padded.

    Returning ``None`` for a batch without padding lets SDPA take its fastest kernel.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


def causal_mask(attention_mask: torch.Tensor | None, query_len: int, key_len: int, device) -> torch.Tensor | None:
    """The decoder mask: query i (at absolute position key_len - query_len + i) sees keys <= itself.

    Args:
        attention_mask: (B, S) with 1 for real tokens (left padding allowed), or None. It covers cached and new
            positions (as in HF), so its width is the key length; a fixed-shape decoding step passes one that
            spans the whole static cache, unwritten slots masked.
        query_len: T, the number of new positions.
        key_len: S, cached plus new positions; used without a mask.

    Returns:
        bool (B or 1, 1, T, S), or ``None`` when nothing is padded and no mask is needed: a plain causal mask
        (T == S; callers pass ``is_causal=True``, which :class:`Attention` applies only when T > 1) or a single
        query, which sees every key (a decoding step; off CUDA only, see below).
    """
    if attention_mask is not None:
        key_len = attention_mask.size(1)
    # The .all() waits for the device, so it is asked only where SDPA can then run without a mask. On CUDA, not
    # for decoding steps: there it would wait once per token, and fail inside a CUDA graph capture.
    single_query = query_len == 1 and (attention_mask is None or not attention_mask.is_cuda)
    if (query_len == key_len or single_query) and (attention_mask is None or bool(attention_mask.all())):
        return None
    causal = torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril(key_len - query_len)[None, None]
    if attention_mask is None:
        return causal
    mask = causal & attention_mask.bool()[:, None, None, :]
    # A left-padding query row sees no real key; let it attend to its causal keys (padding only) instead of
    # producing NaN. Not to every key: a shifted LM loss reads the last padding position's logits (they predict
    # the first real token), and those must not see that token.
    return mask | (causal & ~mask.any(dim=-1, keepdim=True))


# ----------------------------------------------------------------------------------------------
# Packed (unpadded) batches


@dataclass
class RowGroup:
    """Some rows of a packed batch, re-padded together for attention to the longest of them (see :class:`Packing`).

    ``rows`` holds b row ids, ``tokens`` the n packed positions of their tokens (row by row); a row of L' < L
    tokens gets L - L' zeros, hidden from the queries by ``mask``. Without padding, ``slots`` and ``mask`` are None.
    """

    rows: torch.Tensor  # (b,) row ids
    tokens: torch.Tensor  # (n,) positions in the packed (N, ...) layout
    length: int  # L, the group's longest row
    slots: torch.Tensor | None  # (n,) flat positions j * L + t of those tokens in the group's (b, L) layout
    mask: torch.Tensor | None  # (b, 1, 1, L) bool

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, F) packed -> (b, L, F), this group's rows, zeros at padding."""
        x = x.index_select(0, self.tokens)  # (n, F)
        if self.slots is not None:
            x = x.new_zeros(self.rows.numel() * self.length, x.size(-1)).index_copy(0, self.slots, x)
        return x.view(self.rows.numel(), self.length, x.size(-1))

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """(b, L, F) -> (n, F), the real positions only, in the order of ``tokens``."""
        y = y.reshape(-1, y.size(-1))
        return y if self.slots is None else y.index_select(0, self.slots)


# A batch is split into row groups where its rows' lengths spread widely: rows sorted by length, a group takes
# rows down to this fraction of its longest (padding then costs at most 1 / 0.75^2 = 1.8x of a row's attention
# scores), and every row of at most GROUP_MIN_LENGTH tokens goes into one last group (short rows cost little
# padded, and each group costs a few extra small operations per layer). GROUP_RATIO = 0 turns grouping off.
# (Same-process timings at 0.6-0.9 and 16-64 were within 5% of each other on the bench's ragged batches.)
GROUP_RATIO = 0.75
GROUP_MIN_LENGTH = 32


def _row_groups(lengths: list[int], cu_seqlens: list[int]) -> list[RowGroup] | None:
    """Groups of rows of similar length; None when one group would hold them all (re-pad the batch as a whole),
    or when a row is empty (no keys to attend to: the whole-batch path handles that as before)."""
    if min(lengths) == 0:
        return None
    spans: list[list[int]] = []
    for b in sorted(range(len(lengths)), key=lambda b: -lengths[b]):
        longest = lengths[spans[-1][0]] if spans else 0
        if spans and (lengths[b] >= GROUP_RATIO * longest or longest <= GROUP_MIN_LENGTH):
            spans[-1].append(b)
        else:
            spans.append([b])
    if len(spans) == 1:
        return None
    groups = []
    for rows in spans:
        L = lengths[rows[0]]
        tokens = torch.cat([torch.arange(cu_seqlens[b], cu_seqlens[b + 1]) for b in rows])
        slots = mask = None
        if lengths[rows[-1]] < L:  # (rows run longest first: the last is the shortest)
            real = torch.arange(L)[None] < torch.tensor([lengths[b] for b in rows])[:, None]  # (b, L)
            slots, mask = real.flatten().nonzero().squeeze(1), real[:, None, None]  # slots row by row, as ``tokens``
        groups.append(RowGroup(torch.tensor(rows), tokens, L, slots, mask))
    return groups


@dataclass
class Packing:
    """Where the real tokens of a padded (B, T) batch sit once packed into (N, C), N real tokens in all.

    Outside attention an encoder treats every position on its own (embeddings, projections, MLP, norms),
    so those run on the N real tokens only and padding costs nothing. Attention needs rows: on CUDA it hands
    the row offsets ``cu_seqlens`` to a varlen kernel; otherwise it re-pads (``pad``, then a key mask), on the
    CPU group by group (``groups``) where the rows' lengths differ widely, since attention's cost grows with the
    square of the padded length: one row of 256 among rows of ~64 would otherwise make every row cost 16 times
    its own attention.
    """

    index: torch.Tensor  # (N,) flat positions b * T + t of the real tokens, row by row
    batch: int  # B
    length: int  # T
    mask: torch.Tensor  # (B, 1, 1, T) bool: the keys of the re-padded batch a query may attend to
    cu_seqlens: torch.Tensor  # (B + 1,) int32: row b is packed[cu_seqlens[b] : cu_seqlens[b + 1]]
    max_seqlen: int
    groups: list[RowGroup] | None = None  # CPU: rows re-padded group by group for attention

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> Packing:
        """attention_mask: (B, T) 1 for real tokens, anywhere in the row (right or left padding)."""
        real = attention_mask.bool()
        lengths = real.sum(-1)  # (B,)
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        index = real.flatten().nonzero().squeeze(1)
        packing = cls(index, *real.shape, real[:, None, None, :], cu_seqlens, int(lengths.max()))
        # (on CUDA, reading the lengths would wait for the device, and varlen attention needs no groups; a compiled
        # graph keeps the one padded batch rather than specialise on each batch's grouping)
        if real.is_cpu and not torch.compiler.is_compiling():
            packing.groups = _row_groups(lengths.tolist(), cu_seqlens.tolist())
        return packing

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B or 1, T, ...) -> (N, ...), the real positions only."""
        x = x.expand(self.batch, self.length, *x.shape[2:])
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at padding."""
        out = x.new_zeros(self.batch * self.length, *x.shape[1:]).index_copy(0, self.index, x)
        return out.view(self.batch, self.length, *x.shape[1:])


# ----------------------------------------------------------------------------------------------
# Positions


def sinusoidal_positions(num_positions: int, dim: int, interleave: bool = True) -> torch.Tensor:
    """Vaswani et al. 2017 §3.5: PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(...).

    Args:
        interleave: True for the paper's sin/cos interleaving; False puts all sines in the first
            half and all cosines in the second (the layout Marian checkpoints use).

    Returns:
        (num_positions, dim) float32.
    """
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = position * inv_freq  # (P, ceil(dim / 2))
    out = torch.zeros(num_positions, dim, dtype=torch.float64)
    if interleave:
        out[:, 0::2] = torch.sin(angles)
        out[:, 1::2] = torch.cos(angles[:, : dim // 2])
    else:
        half = (dim + 1) // 2
        out[:, :half] = torch.sin(angles)
        out[:, half:] = torch.cos(angles[:, : dim - half])
    return out.float()


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021): rotate pairs of channels by position-dependent angles.

    Pairs are (i, i + D/2), the "rotate half" layout of Llama checkpoints in HF format.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse: bool = True):
        # model.to(torch.bfloat16) would cast inv_freq too, and position * inv_freq in bf16 is off by whole
        # radians at long range: let the buffer follow the device only, staying float32.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: (B, T) -> cos, sin: (B, 1, T, D), in ``dtype``."""
        angles = position_ids[:, :, None].float() * self.inv_freq[None, None, :]  # (B, T, D/2)
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, D)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D) rotated by the angles in cos / sin: (B, 1, T, D)."""
    return x * cos + _rotate_half(x) * sin


def positions_from_mask(attention_mask: torch.Tensor | None, query_len: int, past_len: int, device) -> torch.Tensor:
    """Position ids that skip left padding: the first real token of every row is position 0.

    Returns:
        (B or 1, T) positions of the T new tokens.
    """
    if attention_mask is None:
        return torch.arange(past_len, past_len + query_len, device=device)[None]
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -query_len:]


# ----------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of every decoder layer, grown by one step at a time during generation.

    Cross-attention keys and values (encoder-decoder models) are computed once and kept in
    ``cross``; self-attention ones are appended in :meth:`update`.
    """

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        """Number of cached positions."""
        return self.keys[0].size(-2) if self.keys else 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, K, T, D) keys and values for a layer; return all of them, (B, K, S, D)."""
        if layer_idx == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Select batch rows (beam search): every cached tensor becomes ``t[beam_idx]``."""
        self.keys = [k.index_select(0, beam_idx) for k in self.keys]
        self.values = [v.index_select(0, beam_idx) for v in self.values]
        self.cross = {i: (k.index_select(0, beam_idx), v.index_select(0, beam_idx)) for i, (k, v) in self.cross.items()}


class StaticKVCache(KVCache):
    """A KV cache of fixed capacity: each layer's buffers are allocated once and filled in place.

    :class:`KVCache` concatenates at every step, copying the whole cache (O(S) per step, O(S^2) per
    sequence); here a step writes only its own positions and attention reads a view of the filled part.

    With ``write_index`` set (a (T,) device tensor of positions), a step writes there and attention reads all
    ``max_len`` positions, the unwritten ones hidden by the attention mask: every step then has the same shapes
    and addresses, which is what a CUDA graph needs (see ``generate(cache="graph")``). The buffers start as
    zeros so that masked, never-written positions hold numbers, not NaNs from uninitialised memory.

    Args:
        max_len: the most positions ever cached (prompt + new tokens).
    """

    def __init__(self, max_len: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.lengths: list[int] = []  # filled positions, per layer (layer 0 runs ahead within a step)
        self.write_index: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.lengths[0] if self.lengths else 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, K, T, D) keys and values after the filled part (or at ``write_index``); return views of the
        filled part (B, K, S, D) (or all ``max_len`` positions)."""
        if layer_idx == len(self.keys):
            B, K, _, D = k.shape
            self.keys.append(k.new_zeros(B, K, self.max_len, D))
            self.values.append(v.new_zeros(B, K, self.max_len, D))
            self.lengths.append(0)
        if self.write_index is not None:
            self.keys[layer_idx].index_copy_(2, self.write_index, k)
            self.values[layer_idx].index_copy_(2, self.write_index, v)
            return self.keys[layer_idx], self.values[layer_idx]
        start, end = self.lengths[layer_idx], self.lengths[layer_idx] + k.size(-2)
        if end > self.max_len:
            raise ValueError(f"StaticKVCache holds {self.max_len} positions; {end} were asked for")
        self.keys[layer_idx][:, :, start:end] = k
        self.values[layer_idx][:, :, start:end] = v
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


# ----------------------------------------------------------------------------------------------
# Multi-head attention


class Attention(nn.Module):
    """Multi-head (or grouped-query) attention: project, split heads, attend, merge, project.

    Reads from the config: ``hidden_size``, ``num_heads``, ``num_kv_heads`` (default ``num_heads``),
    ``head_dim`` (default ``hidden_size / num_heads``), ``attention_bias``, ``attention_dropout``,
    ``attn_implementation``.

    Args:
        config: the model config.
        layer_idx: index of the layer, for the KV cache.
        is_cross: keys and values come from another sequence (the encoder output).
    """

    def __init__(self, config, layer_idx: int = 0, is_cross: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_cross = is_cross
        self.num_heads = config.num_heads
        self.num_kv_heads = getattr(config, "num_kv_heads", None) or config.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_heads
        self.dropout = getattr(config, "attention_dropout", 0.0)
        self.scale = getattr(config, "attention_scale", None)
        self.attend = ATTENTION_FUNCTIONS[config.attn_implementation]
        bias = getattr(config, "attention_bias", True)
        out_bias = getattr(config, "attention_out_bias", bias)
        C, HD, KD = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(C, HD, bias=bias)
        self.k_proj = Linear(C, KD, bias=bias)
        self.v_proj = Linear(C, KD, bias=bias)
        self.out_proj = Linear(HD, C, bias=out_bias)
        self._fused_qkv: tuple | None = None  # (weights' identity, (H + 2K) * D x C weight, bias), built on demand

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, D)

    def _project_qkv(self, x: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., C) -> q (..., H * D), k and v (..., K * D).

        ``fused``: one GEMM on the concatenated weights instead of three. That pays when a call has few rows
        (a decoding step), where each GEMM costs a weight pass and a launch more than its arithmetic. The
        concatenation is cached, and rebuilt when a weight is updated in place (its version) or moved
        (its address); it costs a second copy of the q, k, v weights while kept.
        """
        if not fused:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        KD = self.num_kv_heads * self.head_dim
        return self._fused_projection(x).split([self.num_heads * self.head_dim, KD, KD], dim=-1)

    def _fused_projection(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., (H + 2K) * D): q, k and v side by side, from one GEMM on the concatenated weights."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        params = [p for m in projections for p in (m.weight, m.bias) if p is not None]
        identity = tuple((p.data_ptr(), p._version) for p in params)
        if self._fused_qkv is None or self._fused_qkv[0] != identity:
            weight = torch.cat([m.weight for m in projections]).detach()  # ((H + 2K) * D, C)
            bias = torch.cat([m.bias for m in projections]).detach() if self.q_proj.bias is not None else None
            self._fused_qkv = (identity, weight, bias)
        _, weight, bias = self._fused_qkv
        return linear(x, weight, bias)

    def _decode_qkv(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A decoding step's q (B, H, T, D), rotated k and v (B, K, T, D) from x (B, T, C), in few operations.

        Queries and keys lie side by side in the fused projection's output, so one rotation covers both (half the
        small operations of rotating them apart, which count when a step is one token through many layers).
        """
        B, T, _ = x.shape
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self._fused_projection(x)  # (B, T, (H + 2K) * D)
        cos, sin = rotary  # (B, 1, T, D)
        qk = apply_rotary(qkv[..., : (H + K) * D].view(B, T, H + K, D), cos.transpose(1, 2), sin.transpose(1, 2))
        v = qkv[..., (H + K) * D :].view(B, T, K, D)
        return qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), v.transpose(1, 2)

    def _forward_packed(self, x: torch.Tensor, packing: Packing, context: torch.Tensor | None) -> torch.Tensor:
        """Bidirectional self-attention within each row of a packed batch: (N, C) -> (N, C).

        With ``context`` (N, C), ``x`` is (B, C), one query per row, and so is the output.
        """
        N, H, K, D = x.size(0), self.num_heads, self.num_kv_heads, self.head_dim
        if context is None:
            q, k, v = self._project_qkv(x, fused=False)  # (N, H * D), (N, K * D), (N, K * D)
        else:
            q, k, v = self.q_proj(x), self.k_proj(context), self.v_proj(context)  # (B, H * D), (N, K * D) x 2
        dropout_p = self.dropout if self.training else 0.0
        if (
            context is None
            and varlen_attn is not None
            and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16)  # bf16 weights, or autocast
            and self.attend is sdpa_attention
            and ("scale" in _VARLEN_KWARGS or self.scale in (None, self.head_dim**-0.5))
            and ("enable_gqa" in _VARLEN_KWARGS or K == H)
            and (dropout_p == 0.0 or K == H)
        ):
            # flash attention over the packed rows, no re-padding
            cu, longest = packing.cu_seqlens, packing.max_seqlen
            q, k, v = q.view(N, H, D), k.view(N, K, D), v.view(N, K, D)
            if dropout_p > 0.0:  # training: varlen_attn has no dropout; the same kernel through its aten op
                y = varlen_dropout_attention(q, k, v, cu, longest, dropout_p, self.scale)
                return self.out_proj(y.reshape(N, H * D))
            kwargs = {"scale": self.scale} if "scale" in _VARLEN_KWARGS else {}
            if K != H:
                kwargs["enable_gqa"] = True
            y = varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)  # (N, H, D)
            return self.out_proj(y.reshape(N, H * D))
        if packing.groups is not None:
            return self.out_proj(self._attend_groups(q, k, v, packing, context is not None, dropout_p))
        k = self._heads(packing.pad(k), K)  # (B, K, T, D)
        v = self._heads(packing.pad(v), K)  # (B, K, T, D)
        if context is not None:
            q = q.view(packing.batch, 1, H, D).transpose(1, 2)  # (B, H, 1, D)
            y = self.attend(q, k, v, mask=packing.mask, dropout_p=dropout_p, scale=self.scale)  # (B, H, 1, D)
            return self.out_proj(y.reshape(packing.batch, H * D))  # (B, C)
        q = self._heads(packing.pad(q), H)  # (B, H, T, D)
        y = self.attend(q, k, v, mask=packing.mask, dropout_p=dropout_p, scale=self.scale)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(packing.batch, packing.length, H * D)  # (B, T, H * D)
        return self.out_proj(packing.unpad(y))  # (N, C)

    def _attend_groups(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing, one_query: bool, dropout_p: float
    ) -> torch.Tensor:
        """Attention within each row, one row group at a time: q (N, H * D) (or (B, H * D), one query per row),
        k and v (N, K * D) -> (N, H * D) (or (B, H * D))."""
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        out = q.new_empty(q.size(0), H * D)
        for group in packing.groups:
            b, L = group.rows.numel(), group.length
            k_g = group.pad(k).view(b, L, K, D).transpose(1, 2)  # (b, K, L, D)
            v_g = group.pad(v).view(b, L, K, D).transpose(1, 2)
            if one_query:
                q_g = q.index_select(0, group.rows).view(b, 1, H, D).transpose(1, 2)  # (b, H, 1, D)
            else:
                q_g = group.pad(q).view(b, L, H, D).transpose(1, 2)  # (b, H, L, D)
            y = self.attend(q_g, k_g, v_g, mask=group.mask, dropout_p=dropout_p, scale=self.scale)  # (b, H, L', D)
            y = y.transpose(1, 2).reshape(b, -1, H * D)
            if one_query:
                out.index_copy_(0, group.rows, y.reshape(b, H * D))
            else:
                out.index_copy_(0, group.tokens, group.unpad(y))
        return out

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        memory: torch.Tensor | None = None,
        packing: Packing | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``x`` to itself, or to ``memory`` for cross-attention.

        Args:
            x: (B, T, C) inputs, or (N, C) real tokens with ``packing``.
            mask: bool, broadcastable to (B, H, T, S); True where attending is allowed.
            is_causal: use a plain causal mask (only when ``mask`` is None and nothing is cached).
            rotary: cos, sin (B, 1, T, D) to rotate queries and keys by.
            cache: a KV cache to read and extend.
            memory: (B, S, C) encoder states for cross-attention.
            packing: ``x`` holds the real tokens of a padded batch (bidirectional self-attention only).
            context: self-attention computed for some positions only: ``x`` (B, T', C) holds their inputs and
                ``context`` (B, T, C) every position's, which keys and values come from (no cache, no rotary).
                With ``packing``: ``x`` (B, C) one position per row, ``context`` (N, C).

        Returns:
            (B, T, C), or (N, C) with ``packing`` ((B, C) with ``context`` too).
        """
        if packing is not None:
            return self._forward_packed(x, packing, context)
        B, T, _ = x.shape
        decoding = cache is not None and not torch.is_grad_enabled()  # one GEMM for q, k and v pays off here
        if self.is_cross:
            q = self._heads(self.q_proj(x), self.num_heads)  # (B, H, T, D)
            if cache is not None and self.layer_idx in cache.cross:
                k, v = cache.cross[self.layer_idx]  # encoder keys / values, computed at the first step
            else:
                k = self._heads(self.k_proj(memory), self.num_kv_heads)  # (B, K, S, D)
                v = self._heads(self.v_proj(memory), self.num_kv_heads)  # (B, K, S, D)
                if cache is not None:
                    cache.cross[self.layer_idx] = (k, v)
        elif decoding and context is None and rotary is not None:
            q, k, v = self._decode_qkv(x, rotary)  # (B, H, T, D), (B, K, T, D) x 2; q and k rotated
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, D)
        else:
            if context is None:
                q, k, v = self._project_qkv(x, fused=decoding)
            else:
                q, k, v = self.q_proj(x), self.k_proj(context), self.v_proj(context)
            q = self._heads(q, self.num_heads)  # (B, H, T, D)
            k = self._heads(k, self.num_kv_heads)  # (B, K, T, D)
            v = self._heads(v, self.num_kv_heads)  # (B, K, T, D)
            if rotary is not None:
                q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, D)
        dropout_p = self.dropout if self.training else 0.0
        # a single query (a decoding step) sees every key: SDPA's is_causal would align it with the first one
        is_causal = is_causal and mask is None and T > 1
        y = self.attend(q, k, v, mask=mask, is_causal=is_causal, dropout_p=dropout_p, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H * D)
        return self.out_proj(y)
