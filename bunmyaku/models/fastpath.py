"""The fast paths of :class:`~bunmyaku.models.attention.Attention`: the same function, computed faster.

``Attention.forward`` reads as the equation; where one of these paths applies it hands the call over in one line
(``if fastpath.applies(...)``). Tests pin every path to the reference (tests/speed, tests/unit/test_attention.py).

Notation as in attention.py; N is the number of real tokens of a packed batch.

Packed rows (:class:`Packing`): an encoder runs a right-padded batch on its N real tokens only, (N, C) instead of
(B, T, C), since everything but attention treats each position on its own. Attention needs rows; it takes one of
four routes, chosen by :func:`packed_route`:

- ``varlen``: flash attention over the packed rows as they are (CUDA, fp16 / bf16, ``varlen_attn``);
- ``varlen-dropout``: the same kernel through its aten op, with dropout on the attention weights (training);
- ``row-groups``: rows of similar length re-padded together (CPU, :class:`RowGroup`): attention's cost grows with
  the square of the padded length, so one long row would otherwise make every short row cost as much as it;
- ``whole-batch``: the batch re-padded as a whole, then a key mask.

Decoding steps (a KV cache, no gradient): q, k and v come from one GEMM on the concatenated weights (few rows per
call, where each GEMM costs a pass over its weight and a launch more than its arithmetic), and a rotary model
rotates q and k together.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

# attention.py imports this module for its dispatch line: a cycle, safe because only the module object is bound here
# and its functions (apply_rotary) are looked up at call time
from bunmyaku.models import attention as reference
from bunmyaku.models.linear import Linear, linear

if TYPE_CHECKING:
    from bunmyaku.models.attention import Attention, KVCache

try:
    from torch.nn.attention.varlen import varlen_attn

    # the keyword set grew across torch releases (2.10 has neither ``scale`` nor ``enable_gqa``)
    _VARLEN_KWARGS = frozenset(inspect.signature(varlen_attn).parameters)
except ImportError:  # torch without variable-length flash attention: packed batches re-pad for attention
    varlen_attn = None
    _VARLEN_KWARGS = frozenset()


def applies(attn: Attention, cache: KVCache | None, packing: Packing | None, context: torch.Tensor | None) -> bool:
    """Whether :func:`forward` takes this call: a packed batch, or a decoding step of self-attention."""
    return packing is not None or (
        cache is not None
        and context is None
        and not attn.is_cross
        and not torch.is_grad_enabled()
        # the fused step reads the projections' weights: a wrapped projection (a LoRA layer) must run as a module
        and all(type(m) is Linear for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        # tensor parallelism: the projections' weights are DTensors, run as modules by their hooks
        and not hasattr(attn.q_proj.weight, "device_mesh")
    )


def forward(attn, x, mask, is_causal, rotary, cache, packing, context) -> torch.Tensor:
    """``attn(x, ...)`` on its fast path; the arguments are :meth:`Attention.forward`'s."""
    if packing is not None:
        return packed_attention(attn, x, packing, context)
    return decoding_step(attn, x, mask, is_causal, rotary, cache)


# ----------------------------------------------------------------------------------------------
# Decoding steps


def fused_projection(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (..., (H + 2K) * D): q, k and v side by side, from one GEMM on the concatenated weights.

    The concatenation is kept on ``attn`` and rebuilt when a weight is updated in place (its version) or moved (its
    address); it costs a second copy of the q, k, v weights while kept.
    """
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    params = [p for m in projections for p in (m.weight, m.bias) if p is not None]
    identity = tuple((p.data_ptr(), p._version) for p in params)
    if attn._fused_qkv is None or attn._fused_qkv[0] != identity:
        weight = torch.cat([m.weight for m in projections]).detach()  # ((H + 2K) * D, C)
        bias = torch.cat([m.bias for m in projections]).detach() if attn.q_proj.bias is not None else None
        attn._fused_qkv = (identity, weight, bias)
    _, weight, bias = attn._fused_qkv
    return linear(x, weight, bias)


def decoding_step(attn: Attention, x, mask, is_causal, rotary, cache: KVCache) -> torch.Tensor:
    """Self-attention of T new positions (B, T, C) over the cache and themselves, as the reference computes it."""
    B, T, _ = x.shape
    H, K, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    qkv = fused_projection(attn, x)  # (B, T, (H + 2K) * D)
    if rotary is None:
        q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)  # (B, T, H * D), (B, T, K * D) x 2
        q, k = q.view(B, T, H, D).transpose(1, 2), k.view(B, T, K, D).transpose(1, 2)  # (B, H, T, D), (B, K, T, D)
    else:  # q and k lie side by side: one rotation covers both, half the small operations
        cos, sin = rotary  # (B, 1, T, D)
        qk = qkv[..., : (H + K) * D].view(B, T, H + K, D)
        qk = reference.apply_rotary(qk, cos.transpose(1, 2), sin.transpose(1, 2))  # (B, T, H + K, D)
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # (B, H, T, D), (B, K, T, D)
        v = qkv[..., (H + K) * D :]  # (B, T, K * D)
    v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
    k, v = cache.update(attn.layer_idx, k, v)  # (B, K, S, D)
    is_causal = is_causal and mask is None and T > 1
    dropout_p = attn.dropout if attn.training else 0.0
    y = attn.attend(q, k, v, mask=mask, is_causal=is_causal, dropout_p=dropout_p, scale=attn.scale)  # (B, H, T, D)
    return attn.out_proj(y.transpose(1, 2).reshape(B, T, H * D))


# ----------------------------------------------------------------------------------------------
# Packed (unpadded) batches


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
# (BENCHMARKS.md: other values of both were measured, with no clear difference.)
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
    """Where the real tokens of a padded (B, T) batch sit once packed into (N, C), N real tokens in all."""

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

    def unpad_inputs(self, input_ids, token_type_ids, position_ids, inputs_embeds):
        """An encoder's inputs as real tokens: ids, segments, positions (N,) and embeddings (N, C); segments default
        to 0. ``position_ids`` must already be filled on the padded (B or 1, T) layout (each model knows its own)."""
        ref = input_ids if input_ids is not None else inputs_embeds
        if token_type_ids is None:
            token_type_ids = torch.zeros(1, ref.size(1), dtype=torch.long, device=ref.device)
        return (
            None if input_ids is None else self.unpad(input_ids),
            self.unpad(token_type_ids),
            self.unpad(position_ids),
            None if inputs_embeds is None else self.unpad(inputs_embeds),
        )

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B or 1, T, ...) -> (N, ...), the real positions only."""
        x = x.expand(self.batch, self.length, *x.shape[2:])
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at padding."""
        out = x.new_zeros(self.batch * self.length, *x.shape[1:]).index_copy(0, self.index, x)
        return out.view(self.batch, self.length, *x.shape[1:])


PackedRoute = Literal["varlen", "varlen-dropout", "row-groups", "whole-batch"]


def packed_route(
    attn: Attention, packing: Packing, device: torch.device, dtype: torch.dtype, one_query: bool, dropout_p: float
) -> PackedRoute:
    """How attention runs over a packed batch whose projections are on ``device`` in ``dtype`` (see the module notes).

    ``one_query``: one query per row (the last layer of a [CLS]-only head), which the varlen kernels do not take.
    """
    H, K = attn.num_heads, attn.num_kv_heads
    if (
        not one_query
        and varlen_attn is not None
        and device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)  # bf16 weights, or autocast
        and attn.implementation == "sdpa"
        and ("scale" in _VARLEN_KWARGS or attn.scale in (None, attn.head_dim**-0.5))
        and ("enable_gqa" in _VARLEN_KWARGS or K == H)
        and (dropout_p == 0.0 or K == H)
    ):
        return "varlen-dropout" if dropout_p > 0.0 else "varlen"
    return "row-groups" if packing.groups is not None else "whole-batch"


def packed_attention(attn: Attention, x: torch.Tensor, packing: Packing, context: torch.Tensor | None) -> torch.Tensor:
    """Bidirectional self-attention within each row of a packed batch: (N, C) -> (N, C).

    With ``context`` (N, C), ``x`` is (B, C), one query per row, and so is the output.
    """
    H, K, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    source = x if context is None else context
    q, k, v = attn.q_proj(x), attn.k_proj(source), attn.v_proj(source)  # (N or B, H * D), (N, K * D) x 2
    dropout_p = attn.dropout if attn.training else 0.0
    route = packed_route(attn, packing, q.device, q.dtype, context is not None, dropout_p)
    if route in ("varlen", "varlen-dropout"):
        N, cu, longest = q.size(0), packing.cu_seqlens, packing.max_seqlen
        q, k, v = q.view(N, H, D), k.view(N, K, D), v.view(N, K, D)
        if route == "varlen-dropout":
            y = varlen_dropout_attention(q, k, v, cu, longest, dropout_p, attn.scale)
        else:
            kwargs = {"scale": attn.scale} if "scale" in _VARLEN_KWARGS else {}
            if K != H:
                kwargs["enable_gqa"] = True
            y = varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)  # (N, H, D)
        return attn.out_proj(y.reshape(N, H * D))
    if route == "row-groups":
        return attn.out_proj(_attend_groups(attn, q, k, v, packing, context is not None, dropout_p))
    k = packing.pad(k).view(packing.batch, packing.length, K, D).transpose(1, 2)  # (B, K, T, D)
    v = packing.pad(v).view(packing.batch, packing.length, K, D).transpose(1, 2)  # (B, K, T, D)
    if context is not None:
        q = q.view(packing.batch, 1, H, D).transpose(1, 2)  # (B, H, 1, D)
        y = attn.attend(q, k, v, mask=packing.mask, dropout_p=dropout_p, scale=attn.scale)  # (B, H, 1, D)
        return attn.out_proj(y.reshape(packing.batch, H * D))  # (B, C)
    q = packing.pad(q).view(packing.batch, packing.length, H, D).transpose(1, 2)  # (B, H, T, D)
    y = attn.attend(q, k, v, mask=packing.mask, dropout_p=dropout_p, scale=attn.scale)  # (B, H, T, D)
    y = y.transpose(1, 2).reshape(packing.batch, packing.length, H * D)  # (B, T, H * D)
    return attn.out_proj(packing.unpad(y))  # (N, C)


def _attend_groups(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing, one_query: bool, dropout_p
) -> torch.Tensor:
    """Attention within each row, one row group at a time: q (N, H * D) (or (B, H * D), one query per row),
    k and v (N, K * D) -> (N, H * D) (or (B, H * D))."""
    H, K, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    out = q.new_empty(q.size(0), H * D)
    for group in packing.groups:
        b, L = group.rows.numel(), group.length
        k_g = group.pad(k).view(b, L, K, D).transpose(1, 2)  # (b, K, L, D)
        v_g = group.pad(v).view(b, L, K, D).transpose(1, 2)
        if one_query:
            q_g = q.index_select(0, group.rows).view(b, 1, H, D).transpose(1, 2)  # (b, H, 1, D)
        else:
            q_g = group.pad(q).view(b, L, H, D).transpose(1, 2)  # (b, H, L, D)
        y = attn.attend(q_g, k_g, v_g, mask=group.mask, dropout_p=dropout_p, scale=attn.scale)  # (b, H, L', D)
        y = y.transpose(1, 2).reshape(b, -1, H * D)
        if one_query:
            out.index_copy_(0, group.rows, y.reshape(b, H * D))
        else:
            out.index_copy_(0, group.tokens, group.unpad(y))
    return out
