"""DeBERTa's disentangled attention (He et al., 2021, §3.1), computed three ways.

Notation: B batch, H heads, T length, D head dim, s the attention span (``position_buckets``, or
``max_relative_positions`` without buckets), R = 2T - 1 the number of distinct relative distances in a
length-T sequence.

Each score adds, to the content-to-content term, a content-to-position term (the query against the key
projection of the relative position i - j) and a position-to-content term (the key against the query
projection of the same relative position)::

    S[i, j] = (q_i . k_j + q_i . Pk[bucket(i - j)] + k_j . Pq[bucket(i - j)]) * scale

where ``bucket(i - j) = clamp(relative_pos[i, j] + s, 0, 2s - 1)``, ``Pk`` and ``Pq`` being the (H, 2s, D)
projections of the relative-position embeddings (either term may be off: ``pos_att_type``).

- ``reference``: the equation as `transformers` computes it: both position terms against all 2s positions,
  (B, H, T, 2s), then a ``torch.gather`` of (B, H, T, T) each, a full score matrix, ``masked_fill``, softmax.
- ``fast``: the position terms depend on i - j only (``relative_pos`` is Toeplitz), so no (T, T) index exists:
  each block of b query rows is multiplied by the window of T + b - 1 position rows its rows read (fewer than the
  2s of the reference while T < 2s - b), and a relative shift (Transformer-XL, Dai et al., 2019, appendix B: a
  flat view read with a row stride one short) lays the products out as (i, j). Both terms and the padding mask
  go into one (B, H, T, T) bias in one pass (:class:`_PositionBias`, whose backward is written out), then one
  fused add-multiply (``baddbmm``) with the content scores and the softmax. It agrees with the reference at every
  row, padded query rows included (their weights stay uniform in fp32 and bf16; fp16's coarse ``finfo.min`` makes
  them nearly so); its gradient differs only through a padded query row's output, which no real token reads.
- ``flex`` (CUDA): FlexAttention with a ``score_mod`` that adds the two (B, H, T, R) tables, read at the
  distance of (q_idx, kv_idx), and a block mask from the padding, so no (B, H, T, T) tensor exists at all.
  Queries at padding attend to the real keys there (the other paths spread them evenly over every key): only
  the real rows are compared with the reference.

:func:`packed_disentangled_attention` runs any of them over a packed batch (real tokens only, rows grouped by
length on CPU), as the BERT family's unpadded path does (:mod:`bunmyaku.models.fastpath`).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

from bunmyaku.models.fastpath import Packing
from bunmyaku.models.layers import dropout
from bunmyaku.models.sparse_attention import use_flex

Impl = Literal["auto", "reference", "fast", "flex"]


def disentangled_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pos_query: torch.Tensor | None,
    pos_key: torch.Tensor | None,
    relative_pos: torch.Tensor | None,
    span: int,
    mask: torch.Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
    impl: Impl = "auto",
) -> torch.Tensor:
    """DeBERTa's disentangled self-attention, ``softmax(S + mask) V`` with S as in the module docstring.

    Args:
        query: (B, H, T, D) content queries.
        key: (B, H, T, D) content keys.
        value: (B, H, T, D) values.
        pos_query: (H, 2 * span, D) query projection of the relative-position embeddings (the p2c term), or None
            when p2c is off.
        pos_key: (H, 2 * span, D) key projection of the relative-position embeddings (the c2p term), or None when
            c2p is off.
        relative_pos: (T, T) long, the (bucketed) relative position of query i to key j, before adding ``span``;
            it must depend on i - j only, as `transformers`' ``build_relative_position`` makes it; None when
            neither position term is on (no relative attention).
        span: s, the number of relative positions on each side (``position_buckets`` or
            ``max_relative_positions``).
        mask: (B, T) 1 at real tokens, 0 at padding; None for no padding.
        scale: the score scale, 1 / sqrt(D * (1 + number of position terms)).
        dropout_p: dropout on the attention weights (pass 0.0 in eval).
        impl: ``reference``, ``fast``, ``flex`` (CUDA), or ``auto``: flex on CUDA without dropout, fast otherwise.

    Returns:
        (B, H, T, D) the attention output. With padding, rows at padded queries are defined per path (see the
        module docstring); the real rows agree across paths.

    Raises:
        ValueError: on an unknown ``impl``, or shapes that do not fit together.
    """
    _check_shapes(query, key, value, pos_query, pos_key, relative_pos, span, mask)
    if impl == "auto":
        # FlexAttention has no attention dropout: training with it takes the fast path
        impl = "flex" if flex_attention is not None and use_flex(query, dropout_p) else "fast"
    if impl == "reference":
        return reference_attention(query, key, value, pos_query, pos_key, relative_pos, span, mask, scale, dropout_p)
    if impl == "fast":
        return fast_attention(query, key, value, pos_query, pos_key, relative_pos, span, mask, scale, dropout_p)
    if impl == "flex":
        return flex_disentangled_attention(
            query, key, value, pos_query, pos_key, relative_pos, span, mask, scale, dropout_p
        )
    raise ValueError(f"disentangled_attention: impl must be 'auto', 'reference', 'fast' or 'flex', got {impl!r}")


def _check_shapes(query, key, value, pos_query, pos_key, relative_pos, span, mask) -> None:
    if query.dim() != 4 or key.shape != query.shape or value.shape != query.shape:
        raise ValueError(
            "disentangled_attention: query, key and value must all be (B, H, T, D), got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    B, H, T, D = query.shape
    for name, pos in (("pos_query", pos_query), ("pos_key", pos_key)):
        if pos is not None and pos.shape != (H, 2 * span, D):
            raise ValueError(
                f"disentangled_attention: {name} must be (H, 2 * span, D) = {(H, 2 * span, D)}, got {tuple(pos.shape)}"
            )
    if _bad_relative_pos(pos_query, pos_key, relative_pos, T):
        raise ValueError(
            f"disentangled_attention: relative_pos must be (T, T) = {(T, T)} with a position term, got "
            f"{None if relative_pos is None else tuple(relative_pos.shape)}"
        )
    if mask is not None and mask.shape != (B, T):
        raise ValueError(f"disentangled_attention: mask must be (B, T) = {(B, T)}, got {tuple(mask.shape)}")


def _bad_relative_pos(pos_query, pos_key, relative_pos, length: int) -> bool:
    """Whether a position term is on and ``relative_pos`` is not the (T, T) table it reads."""
    positional = pos_query is not None or pos_key is not None
    return positional and (relative_pos is None or relative_pos.shape != (length, length))


def _pair_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, 1, T, T) bool, True where query i and key j are both real (`transformers`' extended mask)."""
    real = mask.bool()
    return real[:, None, :, None] & real[:, None, None, :]


def reference_attention(query, key, value, pos_query, pos_key, relative_pos, span, mask, scale, dropout_p=0.0):
    """The reference path, `transformers`' ``DisentangledSelfAttention`` step by step (arguments as
    :func:`disentangled_attention`): it divides by ``1 / scale`` rounded to the input dtype, as `transformers`
    does, so that it matches in bf16 too."""
    weights = reference_weights(query, key, pos_query, pos_key, relative_pos, span, mask, scale)
    if dropout_p > 0.0:
        weights = dropout(weights, dropout_p)
    return weights @ value


def reference_weights(query, key, pos_query, pos_key, relative_pos, span, mask, scale) -> torch.Tensor:
    """The reference path's (B, H, T, T) attention weights before dropout (what ``output_attentions`` returns)."""
    B, H, T, D = query.shape
    # transformers divides by sqrt(D * factor), computed in fp32 and cast to the scores' dtype
    divisor = torch.tensor(1.0 / scale, dtype=torch.float32, device=query.device).to(query.dtype)
    scores = query @ (key.transpose(-1, -2) / divisor)  # (B, H, T, T)
    if relative_pos is not None:  # None without relative attention (no position term reads it)
        relative_pos = relative_pos.to(device=query.device, dtype=torch.long)
    rel = None
    if pos_key is not None:
        c2p_index = torch.clamp(relative_pos + span, 0, 2 * span - 1)  # (T, T)
        c2p = query @ pos_key.transpose(-1, -2)  # (B, H, T, 2s)
        c2p = torch.gather(c2p, -1, c2p_index.expand(B, H, T, T))  # [b, h, i, j] = q_i . Pk[bucket(i - j)]
        rel = c2p / divisor
    if pos_query is not None:
        # transformers indexes by -relative_pos[j, i]; buckets are odd in i - j, so that is relative_pos[i, j]
        p2c_index = torch.clamp(-relative_pos + span, 0, 2 * span - 1)  # (T, T)
        p2c = key @ pos_query.transpose(-1, -2)  # (B, H, T, 2s)
        p2c = torch.gather(p2c, -1, p2c_index.expand(B, H, T, T)).transpose(-1, -2)  # [b, h, i, j]
        rel = p2c / divisor if rel is None else rel + p2c / divisor
    if rel is not None:
        scores = scores + rel
    if mask is not None:
        scores = scores.masked_fill(~_pair_mask(mask), torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1)


def distance_buckets(relative_pos: torch.Tensor, span: int) -> torch.Tensor:
    """The position row of each relative distance: (T, T) Toeplitz ``relative_pos`` -> (R,) long, entry
    r = ``clamp(relative_pos[i, j] + span, 0, 2 span - 1)`` for i - j = r - (T - 1)."""
    # the first column holds the distances 0 .. T - 1, the first row 0 .. -(T - 1)
    distances = torch.cat([relative_pos[0, 1:].flip(0), relative_pos[:, 0]])
    return torch.clamp(distances.to(torch.long) + span, 0, 2 * span - 1)


# Query rows per block of the fast path's position products, at most: a block of b rows needs T + b - 1 distances,
# not the whole 2T - 1, so smaller blocks multiply less and larger ones make larger products (module-level so
# that tests can shrink it). b divides T; a length with no divisor in [MIN_BLOCK, BLOCK] (a prime) takes one block.
BLOCK = 32
MIN_BLOCK = 8


def _block_size(length: int) -> int:
    fits = [b for b in range(min(BLOCK, length), min(MIN_BLOCK, BLOCK) - 1, -1) if length % b == 0 and b >= 2]
    return fits[0] if fits else length


def _window_index(buckets: torch.Tensor, blocks: int, block: int, width: int) -> torch.Tensor:
    """(nb * W,) the position rows block n reads, block after block: the offsets from (nb - 1 - n) b on."""
    starts = torch.arange(blocks - 1, -1, -1, device=buckets.device) * block  # (nb,)
    return buckets[starts[:, None] + torch.arange(width, device=buckets.device)].flatten()


def _query_blocks(content: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, T, D) -> (H * nb, B * b, D): each head's n-th block of b rows, for the whole batch at once."""
    B, H, T, D = content.shape
    return content.unflatten(2, (T // block, block)).permute(1, 2, 0, 3, 4).reshape(H * (T // block), B * block, D)


def shifted(products: torch.Tensor, length: int) -> torch.Tensor:
    """(H, nb, B, b, W) -> (B, H, nb, b, T) view, ``out[.., n, t, u] = products[.., n, .., t, b - 1 - t + u]``:
    in each (b, W) block, the flat block from offset b - 1, read as rows of W - 1, cut to T columns."""
    block, width = products.shape[-2:]
    if width == 1:  # T = 1
        return products.permute(2, 0, 1, 3, 4)
    flat = products.flatten(-2)[..., block - 1 : block - 1 + block * (width - 1)]
    return flat.unflatten(-1, (block, width - 1))[..., :length].permute(2, 0, 1, 3, 4)


def write_windows(out: torch.Tensor, values: torch.Tensor, length: int) -> torch.Tensor:
    """The inverse of :func:`shifted`: ``values`` (B, H, nb, b, T) into the windows of ``out`` (H, nb, B, b, W),
    zeros around them. Only the b - 1 entries per row outside the windows are cleared, not the whole tensor: in the
    flat block, the b - 1 before the first window, the b - 2 between two rows' windows, the b - 1 after the last."""
    block, width = out.shape[-2:]
    shifted(out, length).copy_(values)
    if width > 1:
        flat = out.flatten(-2)
        flat[..., : block - 1].zero_()
        flat[..., block - 1 : block - 1 + block * (width - 1)].unflatten(-1, (block, width - 1))[..., length:].zero_()
        flat[..., -1].zero_()
    return out


class _PositionBias(torch.autograd.Function):
    """c2p + p2c as one (B, H, T, T) tensor, masked in place, with a hand-written backward.

    Each term multiplies every block of b rows (queries for c2p, keys for p2c) by the window of W = T + b - 1
    position rows it reads: row t of the (T, T) scores needs ``pos[buckets[T - 1 - t + u]]`` for u = 0 .. T - 1,
    a window sliding down by one per row (Transformer-XL's relative shift), so the n-th block of b rows needs the
    W rows from (nb - 1 - n) b on, the same for the whole batch: one batched product (H * nb, B * b, D) x
    (H * nb, D, W), read out by :func:`shifted` (views) into the bias in one pass. The backward writes the bias
    gradient back into the windows (:func:`write_windows`) and multiplies once more each way; autograd through the
    views and reshapes would copy at each step.

    The gradient is not cleared at masked entries: a query row with any real key has a softmax weight of exactly 0
    there, so the incoming gradient is 0 already; only a padded query row (every key masked) passes some on, and
    its output never reaches a real token.
    """

    @staticmethod
    def forward(ctx, query, key, pos_query, pos_key, buckets, scale, attend):
        B, H, T, D = query.shape
        block = _block_size(T)
        blocks, width = T // block, T + block - 1
        out = query.new_empty(B, H, T, T)
        saved, written = [], False
        # c2p[i, j] = q_i . Pk[bucket(i - j)]: along a row (j up) i - j falls, so its windows run by falling i - j;
        # p2c[i, j] = k_j . Pq[bucket(i - j)] is laid out by key j, along which i - j rises, then transposed into
        # place (in place into views of ``out``: torch.compile's functionalization lays an add(out=) out by strides)
        for content, pos, order, c2p in ((query, pos_key, buckets.flip(0), True), (key, pos_query, buckets, False)):
            if pos is None:
                saved += [None, None, None]
                continue
            index = _window_index(order, blocks, block, width)
            rows = _query_blocks(content, block)
            windows = (pos * scale).index_select(-2, index).view(H * blocks, width, D)
            products = torch.bmm(rows, windows.transpose(1, 2)).view(H, blocks, B, block, width)
            if c2p:
                target, values = out.view(B, H, blocks, block, T), shifted(products, T)
            else:
                target, values = out.view(B, H, T, blocks, block), shifted(products, T).permute(0, 1, 4, 2, 3)
            if written:
                target.add_(values)
            else:
                target.copy_(values)
            written = True
            saved += [rows, windows, index]
        if attend is not None:
            out.masked_fill_(~attend, torch.finfo(out.dtype).min)
        ctx.save_for_backward(*saved)
        ctx.scale, ctx.span2 = scale, (pos_key if pos_key is not None else pos_query).size(-2)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        B, H, T, _ = grad.shape
        saved = ctx.saved_tensors
        d_query = d_key = d_pos_query = d_pos_key = None
        for term, (rows, windows, index) in enumerate((saved[:3], saved[3:])):
            if rows is None:
                continue
            blocks, width, D = rows.size(0) // H, windows.size(1), rows.size(-1)
            block = T // blocks
            if term == 0:  # c2p: grad[.., n_i, t_i, j]
                values = grad.view(B, H, blocks, block, T)
            else:  # p2c: grad[.., i, n_j, t_j], read as [.., n_j, t_j, i]
                values = grad.view(B, H, T, blocks, block).permute(0, 1, 3, 4, 2)
            d_products = write_windows(grad.new_empty(H, blocks, B, block, width), values, T)
            d_products = d_products.view(H * blocks, B * block, width)
            d_content = torch.bmm(d_products, windows).view(H, blocks, B, block, D).permute(2, 0, 1, 3, 4)
            d_content = d_content.reshape(B, H, T, D)
            d_windows = torch.bmm(d_products.transpose(1, 2), rows).view(H, blocks * width, D)
            d_pos = grad.new_zeros(H, ctx.span2, D).index_add_(1, index, d_windows) * ctx.scale
            if term == 0:
                d_query, d_pos_key = d_content, d_pos
            else:
                d_key, d_pos_query = d_content, d_pos
        return d_query, d_key, d_pos_query, d_pos_key, None, None, None


def position_bias(query, key, pos_query, pos_key, relative_pos, span, scale, mask=None) -> torch.Tensor | None:
    """(B, H, T, T) (c2p + p2c) * scale with no (T, T) gather, ``finfo.min`` where ``mask`` (B, T) pairs a padded
    query or key; None when both terms are off."""
    if pos_key is None and pos_query is None:
        return None
    buckets = distance_buckets(relative_pos.to(query.device), span)  # (R,) by i - j = -(T - 1) .. T - 1
    attend = None if mask is None else _pair_mask(mask)
    return _PositionBias.apply(query, key, pos_query, pos_key, buckets, scale, attend)


def fast_attention(query, key, value, pos_query, pos_key, relative_pos, span, mask, scale, dropout_p=0.0):
    """The fast path (arguments as :func:`disentangled_attention`): the position terms from the windows of
    distances each block of rows reads, no gathers, then one ``baddbmm`` for the content scores and the bias."""
    B, H, T, D = query.shape
    bias = position_bias(query, key, pos_query, pos_key, relative_pos, span, scale, mask)
    if bias is None:
        scores = (query @ key.transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores.masked_fill(~_pair_mask(mask), torch.finfo(scores.dtype).min)
    else:
        # masked entries: finfo.min plus a score rounds back to finfo.min in fp32 / bf16, so the weights equal the
        # reference's everywhere (fp16's coarser finfo.min leaves padded query rows only nearly uniform)
        scores = torch.baddbmm(
            bias.view(B * H, T, T),
            query.reshape(B * H, T, D),
            key.reshape(B * H, T, D).transpose(-1, -2),
            alpha=scale,
        ).view(B, H, T, T)
    weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = dropout(weights, dropout_p)
    return weights @ value


def first_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pos_query: torch.Tensor | None,
    pos_key: torch.Tensor | None,
    relative_pos: torch.Tensor | None,
    span: int,
    mask: torch.Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """:func:`disentangled_attention` for query position 0 alone (what a pooler on the first token reads).

    The score row of one query is (B, H, 1, T): the c2p term reads the T position-key rows of ``relative_pos[0]``,
    the p2c term each key against the position-query row of its own distance (column 0 of ``relative_pos``, as the
    reference reads it), so nothing (T, T) is formed and autograd's backward is as small as the forward.

    Args:
        query: (B, H, 1, D) the content query of position 0.
        key, value: (B, H, T, D) every position's.
        relative_pos: (T, T) as :func:`disentangled_attention` takes it (row 0 and column 0 are read); None when
            both position terms are off.
        mask: (B, T) 1 at real tokens, or None. Where position 0 is padding, its weights are uniform, as the
            reference's (a fully masked row).
        pos_query, pos_key, span, scale, dropout_p: as :func:`disentangled_attention`.

    Returns:
        (B, H, 1, D).
    """
    B, H, T, D = key.shape
    shapes_ok = query.shape == (B, H, 1, D) and value.shape == key.shape
    if not shapes_ok or _bad_relative_pos(pos_query, pos_key, relative_pos, T):
        raise ValueError(
            "first_query_attention: query must be (B, H, 1, D), key and value (B, H, T, D) and relative_pos (T, T); "
            f"got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}, "
            f"{None if relative_pos is None else tuple(relative_pos.shape)}"
        )
    if relative_pos is not None:
        relative_pos = relative_pos.to(device=query.device, dtype=torch.long)
    scores = query @ key.transpose(-1, -2)  # (B, H, 1, T)
    if pos_key is not None:  # c2p[0, j] = q_0 . Pk[bucket(0 - j)]
        index = torch.clamp(relative_pos[0] + span, 0, 2 * span - 1)  # (T,)
        scores = scores + query @ pos_key.index_select(1, index).transpose(-1, -2)
    if pos_query is not None:  # p2c[0, j] = k_j . Pq[clamp(span - relative_pos[j, 0])], the reference's index
        index = torch.clamp(span - relative_pos[:, 0], 0, 2 * span - 1)  # (T,)
        scores = scores + (key * pos_query.index_select(1, index)).sum(-1).unsqueeze(2)
    scores = scores * scale
    if mask is not None:
        real = mask.bool()
        attend = real[:, :1, None, None] & real[:, None, None, :]  # (B, 1, 1, T)
        scores = scores.masked_fill(~attend, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = dropout(weights, dropout_p)
    return weights @ value


def _distance_table(content, pos, buckets, scale) -> torch.Tensor:
    """(B, H, T, R), entry [b, h, t, r] = content_t . pos[buckets[r]] * scale, by whichever order multiplies less:
    the R selected rows of ``pos`` (R <= 2s), or all 2s rows, then the R columns the distances select."""
    if buckets.numel() <= pos.size(-2):
        return content @ (pos.index_select(-2, buckets) * scale).transpose(-1, -2)
    return (content @ (pos * scale).transpose(-1, -2)).index_select(-1, buckets)


def packed_disentangled_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pos_query: torch.Tensor | None,
    pos_key: torch.Tensor | None,
    relative_pos: torch.Tensor,
    span: int,
    packing: Packing,
    scale: float,
    dropout_p: float = 0.0,
    impl: Impl = "auto",
) -> torch.Tensor:
    """:func:`disentangled_attention` within each row of a packed batch (:class:`~bunmyaku.models.fastpath.Packing`),
    so that a ragged batch does not pay for its padding: (N, H, D) x 3 -> (N, H, D), N real tokens.

    On CPU the rows go in groups of similar length (``packing.groups``), each re-padded to its own longest row L
    only; otherwise the batch is re-padded as a whole. A relative position depends on i - j only, so it is the
    same in a row wherever the row starts, and a group of length L reads the top-left (L, L) of ``relative_pos``.

    Args:
        query, key, value: (N, H, D) the real tokens, row by row (``packing.unpad`` of (B, T, H, D)).
        relative_pos: (T, T) for the batch's padded length T.
        packing: where the real tokens sit (``Packing.from_mask(attention_mask)``).
        pos_query, pos_key, span, scale, dropout_p, impl: as :func:`disentangled_attention`.
    """
    H, D = query.shape[1:]

    def attend(q, k, v, mask, length):  # (b, L, H, D) x 3, (b, L) -> (b, L, H, D)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, H, L, D)
        rel = relative_pos[:length, :length]
        y = disentangled_attention(q, k, v, pos_query, pos_key, rel, span, mask, scale, dropout_p, impl)
        return y.transpose(1, 2)

    if packing.groups is None:
        B, T = packing.batch, packing.length
        padded = (packing.pad(t.reshape(-1, H * D)).view(B, T, H, D) for t in (query, key, value))
        y = attend(*padded, packing.mask[:, 0, 0, :], T)  # (B, T, H, D)
        return packing.unpad(y.reshape(B, T, H * D)).view(-1, H, D)
    out = query.new_empty(query.size(0), H * D)
    for group in packing.groups:
        b, L = group.rows.numel(), group.length
        padded = (group.pad(t.reshape(-1, H * D)).view(b, L, H, D) for t in (query, key, value))
        mask = None if group.mask is None else group.mask[:, 0, 0, :]
        y = attend(*padded, mask, L)  # (b, L, H, D)
        out.index_copy_(0, group.tokens, group.unpad(y.reshape(b, L, H * D)))
    return out.view(-1, H, D)


try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch without FlexAttention: auto takes the fast path
    create_block_mask = flex_attention = None


@functools.cache
def _compiled_flex():
    # FlexAttention is fast only compiled (eager runs the score_mod over a dense (B, H, T, T) reference)
    return torch.compile(flex_attention, dynamic=False)


def flex_disentangled_attention(query, key, value, pos_query, pos_key, relative_pos, span, mask, scale, dropout_p=0.0):
    """FlexAttention (arguments as :func:`disentangled_attention`): the two (B, H, T, R) distance tables are read
    inside the kernel at the distance of each (q_idx, kv_idx); gradients reach them, hence the projections,
    through FlexAttention's captured-tensor backward. Compiled on CUDA, eager (slow, for tests) elsewhere."""
    if flex_attention is None:
        raise ValueError("disentangled_attention: impl='flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
    if dropout_p > 0.0:
        raise ValueError(
            "disentangled_attention: impl='flex' has no attention dropout; use impl='fast' to train with it"
        )
    B, H, T, D = query.shape
    buckets = distance_buckets(relative_pos.to(query.device), span)
    c2p = _distance_table(query, pos_key, buckets.flip(0), scale) if pos_key is not None else None
    p2c = _distance_table(key, pos_query, buckets, scale) if pos_query is not None else None

    def score_mod(score, b, h, q_idx, kv_idx):
        # c2p runs by falling i - j: column T - 1 - i + j; p2c by rising i - j from key j: column T - 1 + i - j
        if c2p is not None:
            score = score + c2p[b, h, q_idx, T - 1 - q_idx + kv_idx]
        if p2c is not None:
            score = score + p2c[b, h, kv_idx, T - 1 + q_idx - kv_idx]
        return score

    block_mask = None
    if mask is not None:
        real = mask.bool()

        def key_is_real(b, h, q_idx, kv_idx):
            return real[b, kv_idx]

        block_mask = create_block_mask(key_is_real, B, None, T, T, device=query.device)
    attend = _compiled_flex() if query.is_cuda else flex_attention
    return attend(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale)
