"""Attention, positions, masks and the KV cache shared by every architecture.

Notation: B batch, T query length, S key length, C model width, H query heads, K key/value heads
(K < H is grouped-query attention, K == H is multi-head attention), D head dim.

Attention is a soft dictionary look-up: each query scores every key, the scores become weights
with a softmax, and the output is the weighted sum of the values::

    Attention(Q, K, V) = softmax(Q K^T / sqrt(D) + mask) V

``eager_attention`` is that equation written out, the reference the tests compare against;
``F.scaled_dot_product_attention`` computes the same thing with fused kernels and is the default.
Masks are boolean, ``True`` where a query may attend to a key.

:class:`Attention` computes it the plain way; its fast paths (packed rows of an unpadded encoder batch,
fused decoding steps) live in :mod:`bunmyaku.models.fastpath`, behind one line of its ``forward``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bunmyaku.models import fastpath
from bunmyaku.models.config import LayerConfig
from bunmyaku.models.linear import Linear


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(QK^T * scale + mask): how much each query takes from each key, (B, H, T, S), rows summing to 1.

    Args:
        q: (B, H, T, D) queries.
        k: (B, K, S, D) keys; H must be a multiple of K.
        mask: bool, broadcastable to (B, H, T, S); True where attending is allowed.
        is_causal: mask out keys after each query (T == S, no cache).
        scale: defaults to 1 / sqrt(D).
    """
    if k.size(1) != q.size(1):  # grouped-query attention: each K/V head serves H / K query heads
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if is_causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1)


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
    return _weighted_values(attention_weights(q, k, mask, is_causal, scale), v, dropout_p)


def _weighted_values(weights: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """(B, H, T, S) attention weights, (B, K, S, D) values -> (B, H, T, D) their weighted sums."""
    if v.size(1) != weights.size(1):
        v = v.repeat_interleave(weights.size(1) // v.size(1), dim=1)
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


def attention_fields(model: nn.Module) -> dict[str, list[Attention]]:
    """``model``'s attention modules by the output field their weights go to, named as in HF.

    ``attentions`` for an encoder-only or decoder-only model; for an encoder-decoder (one with cross-attention),
    ``encoder_attentions``, ``decoder_attentions`` (self-attention of the modules under a ``decoder``) and
    ``cross_attentions``. Each list is in layer order.
    """
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, Attention)]
    if not any(m.is_cross for _, m in modules):
        return {"attentions": [m for _, m in modules]}
    fields: dict[str, list[Attention]] = {"encoder_attentions": [], "decoder_attentions": [], "cross_attentions": []}
    for name, m in modules:
        field = "cross" if m.is_cross else "decoder" if "decoder" in name.split(".") else "encoder"
        fields[f"{field}_attentions"].append(m)
    return fields


@contextlib.contextmanager
def recorded_attention(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Within the block, every attention of ``model`` runs the eager equation and keeps its weights.

    Yields {field: weights} (see :func:`attention_fields`), each a list the weights are appended to, one
    (B, H, T, S) tensor per layer in the order the layers run: what ``output_attentions=True`` returns (as HF
    returns it from its eager attention). Fused kernels never form the weights, so the fast paths are skipped
    while recording.
    """
    fields = attention_fields(model)
    weights: dict[str, list[torch.Tensor]] = {field: [] for field in fields}
    for field, modules in fields.items():
        for module in modules:
            module.recorded = weights[field]
    try:
        yield weights
    finally:
        for modules in fields.values():
            for module in modules:
                module.recorded = None


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

    def update_cross(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a cross-attention layer's (B, K, S, D) keys and values (the encoder's), computed once; return them."""
        self.cross[layer_idx] = (k, v)
        return k, v

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


# ----------------------------------------------------------------------------------------------
# Multi-head attention


class Attention(nn.Module):
    """Multi-head (or grouped-query) attention: project, split heads, attend, merge, project.

    Args:
        config: the layer's config (heads, head_dim, biases, attention dropout and scale, implementation).
        layer_idx: index of the layer, for the KV cache.
        is_cross: keys and values come from another sequence (the encoder output).
    """

    def __init__(self, config: LayerConfig, layer_idx: int = 0, is_cross: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_cross = is_cross
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.dropout = config.attention_dropout
        self.scale = config.attention_scale
        self.implementation = config.attn_implementation
        self.attend = ATTENTION_FUNCTIONS[config.attn_implementation]
        C, HD, KD = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(C, HD, bias=config.attention_bias)
        self.k_proj = Linear(C, KD, bias=config.attention_bias)
        self.v_proj = Linear(C, KD, bias=config.attention_bias)
        self.out_proj = Linear(HD, C, bias=config.attention_out_bias)
        self._fused_qkv: tuple | None = None  # fastpath's concatenated q, k, v weights for decoding, built on demand
        self.recorded: list[torch.Tensor] | None = None  # set by recorded_attention: keep the weights here

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        memory: torch.Tensor | None = None,
        packing: fastpath.Packing | None = None,
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
                ``context`` (B, S, C) every position's, which keys and values come from (no cache, no rotary).
                With ``packing``: ``x`` (B, C) one position per row, ``context`` (N, C).

        Returns:
            (B, T, C), or (N, C) with ``packing`` ((B, C) with ``context`` too).
        """
        if self.recorded is None and fastpath.applies(self, cache, packing, context):  # packed rows, fused steps
            return fastpath.forward(self, x, mask, is_causal, rotary, cache, packing, context)
        B, T, _ = x.shape
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        if self.is_cross and cache is not None and self.layer_idx in cache.cross:
            k, v = cache.cross[self.layer_idx]  # the encoder's keys and values, computed at the first step
        else:
            source = memory if self.is_cross else x if context is None else context  # (B, S, C)
            k = self.k_proj(source).view(B, -1, K, D).transpose(1, 2)  # (B, K, S, D)
            v = self.v_proj(source).view(B, -1, K, D).transpose(1, 2)  # (B, K, S, D)
            if rotary is not None:
                q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
            if cache is not None:
                k, v = cache.update_cross(self.layer_idx, k, v) if self.is_cross else cache.update(self.layer_idx, k, v)
        # a single query (a decoding step) sees every key: SDPA's is_causal would align it with the first one
        is_causal = is_causal and mask is None and T > 1
        dropout_p = self.dropout if self.training else 0.0
        if self.recorded is not None:  # output_attentions: the equation written out, its weights kept
            weights = attention_weights(q, k, mask, is_causal, self.scale)  # (B, H, T, S)
            self.recorded.append(weights)
            y = _weighted_values(weights, v, dropout_p)  # (B, H, T, D)
        else:
            y = self.attend(q, k, v, mask=mask, is_causal=is_causal, dropout_p=dropout_p, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H * D): heads merged
        return self.out_proj(y)
