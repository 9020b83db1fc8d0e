"""DeBERTa-v2 (He et al. 2021), the architecture DeBERTa-v3 checkpoints use: BERT with disentangled attention.

Notation: B batch, T sequence length, C hidden size, E embedding size, H heads, D head dim, V vocabulary,
R = 2 * span relative-position embeddings, N choices, L labels.

    input_ids, token_type_ids, [positions]
        -> tokens (+ positions when position_biased_input) (+ segments) -> proj E->C -> LayerNorm -> x mask
        -> layer 0 -> [ConvLayer over the embeddings, added to layer 0's output]       (conv_kernel_size > 0)
        -> layers 1 .. num_layers - 1, post-LN like BERT's, each with disentangled attention
        -> last_hidden_state (B, T, C)

Disentangled attention adds to the content score q_i . k_j two position terms, read from one table of R relative
embeddings (LayerNorm-ed when ``norm_rel_ebd`` says so, shared by every layer, projected by each layer):

    score(i, j) = [ q_i . k_j  +  q_i . pk[c2p(i, j)]  +  k_j . pq[p2c(i, j)] ] / sqrt(D * (1 + terms))
    c2p(i, j) = clamp(span + rel(i, j)),  p2c(i, j) = clamp(span - rel(j, i)),  clamp into [0, R - 1]

where rel(i, j) is the (log-bucketed) distance i - j (:func:`relative_positions`) and pk / pq the relative
embeddings projected by the key / query projections (``share_att_key``) or by their own (``pos_k_proj`` /
``pos_q_proj``). Buckets are odd (rel(j, i) = -rel(i, j)), so both terms read row clamp(span + rel(i, j)): a
relative-position bias that depends on i - j only. The attention core is one call,
:func:`bunmyaku.models.disentangled.disentangled_attention`: by default its fast kernels (on CPU the position terms
of a block of queries against only the position rows it reads, laid out by a relative shift, no (B, H, T, T)
gather; FlexAttention on CUDA); with ``attn_implementation="eager"`` the ``transformers``-style computation with
gathers, kept as the reference the fast kernels are tested against.

Padding is handled exactly as ``transformers`` handles it, so that every output and every loss is HF's, padding
positions included (QA's span loss reads them): embeddings are zeroed at padding, the attention mask is the
outer product m_i * m_j (a padding query sees every key at the same score, hence a uniform average), and the
convolution's output is zeroed at padding.

A right-padded batch runs unpadded (``config.unpad``, the default), as :mod:`bunmyaku.models.bert` does: a real
position never reads a padding one (its keys are masked, its relative distances are those of the row alone, and
the convolution reads zeros past the row's end whether padding or a zero pad), so the N real tokens are packed
into (N, C) and only attention sees rows: re-padded group by group (:class:`~bunmyaku.models.fastpath.Packing`'s
row groups, CPU), or as a whole batch (elsewhere, and under ``torch.compile``), each group with the relative
positions of its own length (:class:`PackedRows`). The convolution re-pads the embeddings once, so each row's edges
see zeros. Outputs at padding positions are then zeros; a head whose loss reads them (labels at padding, QA's
softmax over every position) runs the batch padded, so every loss is the one HF computes.

Heads: masked LM (the current ``lm_predictions.lm_head`` layout of the enhanced mask decoder's checkpoints, or the
legacy ``cls.predictions`` one, as ``config.legacy`` says; both are the same computation; as in ``transformers``, the
EMD's extra decoding pass is not run and a checkpoint's ``mask_predictions`` (RTD) head is ignored), sequence
classification (ContextPooler; DeBERTa's own loss rule when ``problem_type`` is unset), token classification,
extractive QA, multiple choice. DeBERTa v1 is built from these parts in :mod:`bunmyaku.models.deberta_v1`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bunmyaku.hub import KeyMap
from bunmyaku.hub.keymap import linear_map
from bunmyaku.models import bert
from bunmyaku.models.attention import Attention
from bunmyaku.models.base import ModelOutput, PreTrainedModel
from bunmyaku.models.config import LayerConfig, ModelConfig
from bunmyaku.models.disentangled import disentangled_attention, first_query_attention, reference_weights
from bunmyaku.models.fastpath import Packing, RowGroup
from bunmyaku.models.heads import flatten_choices, sequence_classification_loss, span_loss, token_loss
from bunmyaku.models.layers import Block, Dropout, activation, dropout
from bunmyaku.models.linear import Linear

POSITION_TERMS = ("c2p", "p2c")


@dataclass
class DebertaV2Config(ModelConfig):
    """DeBERTa-v2 hyper-parameters; defaults are ``transformers``' (deberta-v2-xlarge-like, relative attention off).

    deberta-v3-base sets ``relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
    share_att_key=True, pos_att_type="p2c|c2p", position_biased_input=False``.
    """

    model_type: ClassVar[str] = "deberta-v2"
    HF_NAMES: ClassVar[dict[str, str]] = {
        "num_layers": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "dropout": "hidden_dropout_prob",
        "attention_dropout": "attention_probs_dropout_prob",
        "max_seq_len": "max_position_embeddings",
        "norm_eps": "layer_norm_eps",
        "head_dim": "attention_head_size",
    }
    # written to config.json only when set: ``transformers`` reads their absence as "the default", not None
    OPTIONAL_FIELDS: ClassVar[tuple[str, ...]] = ("embedding_size", "head_dim", "cls_dropout")
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = (*ModelConfig.RUNTIME_FIELDS, "unpad")
    vocab_size: int = 128100
    hidden_size: int = 1536
    num_layers: int = 24
    num_heads: int = 24
    head_dim: int | None = None  # None means hidden_size // num_heads
    intermediate_size: int = 6144
    hidden_act: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    max_seq_len: int = 512
    type_vocab_size: int = 0  # 0: no segment embeddings (token_type_ids are then ignored)
    initializer_range: float = 0.02
    norm_eps: float = 1e-7
    embedding_size: int | None = None  # None means hidden_size; otherwise a projection E -> C follows
    position_biased_input: bool = True  # add absolute position embeddings to the tokens
    relative_attention: bool = False
    max_relative_positions: int = -1  # < 1 means max_seq_len
    position_buckets: int = -1  # > 0: log-bucketed relative distances, 2 * position_buckets embeddings
    pos_att_type: str | list[str] | None = None  # "p2c|c2p", ["c2p"], ...
    share_att_key: bool = False  # project relative embeddings with q_proj / k_proj instead of their own
    norm_rel_ebd: str = "none"  # "layer_norm": LayerNorm the relative embeddings
    conv_kernel_size: int = 0  # > 0: a convolution over the embeddings joins layer 0's output
    conv_act: str = "tanh"
    conv_groups: int = 1
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pooler_hidden_size: int | None = None  # None means hidden_size (the only size HF's heads work with)
    pooler_dropout: float = 0.0
    pooler_hidden_act: str = "gelu"
    cls_dropout: float | None = None  # the classifier's dropout; None means ``dropout``
    legacy: bool = True  # the masked-LM head's checkpoint names: cls.predictions (True) or lm_predictions (False)
    tie_word_embeddings: bool = True
    unpad: bool = True  # run right-padded batches on their real tokens only; False: the plain (B, T, C) path

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(
                f"attention_head_size {self.head_dim} x num_heads {self.num_heads} != hidden_size {self.hidden_size}: "
                "DeBERTa's attention output projection is hidden_size wide (transformers cannot run it either)"
            )
        if self.embedding_size is None:
            self.embedding_size = self.hidden_size
        if self.pooler_hidden_size is None:
            self.pooler_hidden_size = self.hidden_size
        if self.pooler_hidden_size != self.hidden_size:
            raise ValueError(
                f"pooler_hidden_size {self.pooler_hidden_size} != hidden_size {self.hidden_size}: DeBERTa's "
                "classifier reads a pooled vector of hidden_size (as in transformers)"
            )
        if isinstance(self.pos_att_type, str):  # the original configs' "p2c|c2p"
            self.pos_att_type = [t.strip() for t in self.pos_att_type.lower().split("|") if t.strip()]
        unknown = [t for t in self.pos_att_type or [] if t not in POSITION_TERMS]
        if unknown:
            raise ValueError(f"pos_att_type {self.pos_att_type}: unknown terms {unknown}; expected c2p and / or p2c")
        rel_norms = [t.strip() for t in self.norm_rel_ebd.lower().split("|")]
        if any(t not in ("none", "layer_norm") for t in rel_norms):
            raise ValueError(f"norm_rel_ebd {self.norm_rel_ebd!r}: expected 'none' or 'layer_norm'")
        if self.conv_kernel_size > 0 and self.conv_kernel_size % 2 == 0:
            raise ValueError(f"conv_kernel_size {self.conv_kernel_size} must be odd (the output keeps the length)")
        if not self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=False: DeBERTa's masked-LM decoder is always the embedding matrix")
        for name in ("hidden_act", "conv_act", "pooler_hidden_act"):
            activation(getattr(self, name))

    @property
    def position_terms(self) -> tuple[str, ...]:
        """The position terms of the attention score: a subset of ("c2p", "p2c")."""
        return tuple(t for t in POSITION_TERMS if t in (self.pos_att_type or []))

    @property
    def max_relative(self) -> int:
        """The largest relative distance told apart (beyond it, distances share the last embedding)."""
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_seq_len

    @property
    def att_span(self) -> int:
        """Half the number of relative embeddings: ``position_buckets`` when bucketed, else ``max_relative``."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative

    @property
    def rel_layer_norm(self) -> bool:
        return "layer_norm" in [t.strip() for t in self.norm_rel_ebd.lower().split("|")]

    def layer_config(self, layer_idx: int) -> LayerConfig:
        """What each block's MLP and norms read: post-LN, LayerNorm, a GELU MLP, biases everywhere."""
        return LayerConfig(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            pre_norm=False,
            norm_eps=self.norm_eps,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            attn_implementation=self.attn_implementation,  # "eager" selects the reference path
        )

    def to_hf(self) -> dict:
        out = super().to_hf()
        for name in self.OPTIONAL_FIELDS:
            key = self.HF_NAMES.get(name, name)
            if out.get(key) is None or (name == "embedding_size" and out[key] == self.hidden_size):
                out.pop(key, None)
        if self.head_dim == self.hidden_size // self.num_heads:
            out.pop("attention_head_size", None)
        return out


# ----------------------------------------------------------------------------------------------
# Relative positions


def log_bucket_position(relative_pos: torch.Tensor, buckets: int, max_position: int) -> torch.Tensor:
    """Bucket relative distances: exact within +-buckets/2, logarithmic beyond, up to ``max_position``.

    Computed in float32 with the same operations as DeBERTa's original code: a bucket is a ``ceil`` of a log
    ratio, and a different rounding of that ratio would move distances at the edges into the next bucket.

    Args:
        relative_pos: integer distances (any shape).
        buckets: ``position_buckets`` (the number of buckets on each side).
        max_position: ``max_relative_positions`` (the distance the log scale reaches bucket ``buckets - 1`` at).

    Returns:
        float tensor of the same shape: the signed bucket of each distance.
    """
    sign = torch.sign(relative_pos)
    mid = buckets // 2
    near = (relative_pos < mid) & (relative_pos > -mid)
    abs_pos = torch.where(near, torch.tensor(mid - 1).type_as(relative_pos), relative_pos.abs())
    scale = torch.log(torch.tensor((max_position - 1) / mid))  # float32, as the original
    log_pos = torch.ceil(torch.log(abs_pos / mid) / scale * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, relative_pos.type_as(log_pos), log_pos * sign)


def relative_positions(length: int, buckets: int, max_position: int, device=None) -> torch.Tensor:
    """(T, T) long: the (bucketed) relative position ``i - j`` of key j seen from query i.

    The bucket depends on ``i - j`` only, so it is computed for the 2T - 1 distances and read back as a table.
    """
    distances = torch.arange(-(length - 1), length, device=device)  # (2T - 1,)
    if buckets > 0 and max_position > 0:
        distances = log_bucket_position(distances, buckets, max_position).long()
    index = torch.arange(length, device=device)
    return distances[index[:, None] - index[None, :] + length - 1]  # (T, T)


@functools.lru_cache(maxsize=64)
def position_reach(length: int, buckets: int, max_position: int) -> int:
    """The largest |relative position| (bucket) in a length-T sequence: only the relative embeddings within it of
    distance 0 are ever read. Ints in, an int out (cached: one small computation per length)."""
    distances = torch.arange(max(length, 1))
    if buckets > 0 and max_position > 0:
        distances = log_bucket_position(distances, buckets, max_position)
    return int(distances.abs().max())


def right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row's real tokens come first (and the first is real): packing then keeps their distances."""
    real = attention_mask.bool()
    return bool(real[:, 0].all() & ~(real[:, 1:] & ~real[:, :-1]).any())


@dataclass
class PackedRows:
    """A packed batch as attention sees it: its rows re-padded group by group, or as a whole batch.

    ``groups`` holds (row group, key mask (b, L) bool or None, relative positions (L, L) or None) per group; a row
    group of None stands for the whole batch re-padded to T (``packing.pad``).
    """

    packing: Packing
    groups: list[tuple[RowGroup | None, torch.Tensor | None, torch.Tensor | None]]

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor, config: DebertaV2Config) -> PackedRows:
        """attention_mask: (B, T) right-padded, 1 for real tokens."""
        packing = Packing.from_mask(attention_mask)
        device = attention_mask.device
        by_length: dict[int, torch.Tensor] = {}

        def positions(length: int) -> torch.Tensor | None:
            if not config.relative_attention:
                return None
            if length not in by_length:
                by_length[length] = relative_positions(length, config.position_buckets, config.max_relative, device)
            return by_length[length]

        if packing.groups is None:
            groups = [(None, packing.mask[:, 0, 0], positions(packing.length))]
        else:
            groups = [
                (g, None if g.mask is None else g.mask[:, 0, 0].to(device), positions(g.length)) for g in packing.groups
            ]
        return cls(packing, groups)


# ----------------------------------------------------------------------------------------------
# Attention


class DisentangledAttention(Attention):
    """Project, split heads, project the relative embeddings, call the attention core, merge, project.

    ``q_proj`` ... ``out_proj`` are :class:`~bunmyaku.models.attention.Attention`'s (so ``output_attentions`` records
    these weights as it records every model's); the position projections are DeBERTa's own.
    """

    def __init__(self, config: DebertaV2Config, layer_idx: int = 0):
        super().__init__(config.layer_config(layer_idx), layer_idx)
        self.terms = config.position_terms
        self.relative = config.relative_attention
        self.span = config.att_span
        # HF counts the position terms in the scale whether or not relative attention is on
        self.scale = 1.0 / math.sqrt(self.head_dim * (1 + len(self.terms)))
        self.share_att_key = config.share_att_key
        self.buckets, self.max_relative = config.position_buckets, config.max_relative
        C, HD = config.hidden_size, config.num_heads * config.head_dim
        if self.relative and not self.share_att_key:
            if "c2p" in self.terms:
                self.pos_k_proj = Linear(C, HD)
            if "p2c" in self.terms:
                self.pos_q_proj = Linear(C, HD)
        self.pos_dropout = Dropout(config.dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(..., L, H * D) -> (..., H, L, D)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> q, k, v (B, H, T, D)."""
        return self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

    def _project_query(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> q (B, H, T, D), for positions whose keys and values are not wanted."""
        return self._heads(self.q_proj(x))

    def _project_context(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, C) -> k, v (B, H, T, D), for positions whose queries are not wanted."""
        return self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

    def _project_positions(
        self, rel: torch.Tensor, length: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        """(R, C) relative embeddings (after dropout) -> pos_q, pos_k (H, R, D) (None for an absent term), span.

        Only the rows a length-T sequence reads are projected (deberta-v3's 512 rows, T = 128: 256), the others
        are zeros: the kernels read (H, 2 * span, D) tables, and this keeps their indices. Under ``torch.compile``
        every row is projected (the reach is computed in Python, per length).
        """
        span, reach = self.span, self.span
        if not torch.compiler.is_compiling():
            reach = min(span, position_reach(length, self.buckets, self.max_relative) + 1)
        if reach < span:
            rel = rel[span - reach : span + reach]  # rows span + r for |r| < reach
        pos_q = pos_k = None
        if "c2p" in self.terms:
            pos_k = self._heads((self.k_proj if self.share_att_key else self.pos_k_proj)(rel))  # (H, R, D)
        if "p2c" in self.terms:
            pos_q = self._heads((self.q_proj if self.share_att_key else self.pos_q_proj)(rel))  # (H, R, D)
        if reach < span:
            pos_q, pos_k = (None if t is None else F.pad(t, (0, 0, span - reach, span - reach)) for t in (pos_q, pos_k))
        return pos_q, pos_k, span

    def _positions(self, rel_embeddings: torch.Tensor | None, length: int):
        """pos_q, pos_k (H, R, D) or None, span: the relative embeddings projected for a batch of length T."""
        if self.relative and self.terms:
            return self._project_positions(self.pos_dropout(rel_embeddings), length)
        return None, None, self.span

    def _attend(self, q, k, v, pos_q, pos_k, relative_pos, span: int, mask, dropout_p: float) -> torch.Tensor:
        """The attention core, (B, H, T, D) -> (B, H, T, D): the one call both the padded and packed paths make.
        ``attn_implementation`` "eager" runs the transformers-style reference, "sdpa" (default) the fast kernels."""
        impl = "reference" if self.implementation == "eager" else "auto"
        return disentangled_attention(q, k, v, pos_q, pos_k, relative_pos, span, mask, self.scale, dropout_p, impl)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        rel_embeddings: torch.Tensor | None,
        relative_pos,
        packed: PackedRows | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C); mask: (B, T) or None; rel_embeddings: (R, C) (normed) or None -> (B, T, C).

        With ``packed``, x is (N, C), the real tokens of a packed batch, and so is the output (``mask`` and
        ``relative_pos`` are then unused: each row group carries its own).

        With ``context``, only position 0 is computed: ``x`` is its input, (B, 1, C), or (B, C) with ``packed``,
        ``context`` every position's, (B, T, C), or (N, C) with ``packed``, which keys and values come from;
        ``relative_pos`` is then (T, T) for the batch's length T in both layouts.
        """
        dropout_p = self.dropout if self.training else 0.0
        if context is not None:
            return self.out_proj(self._first(x, context, mask, rel_embeddings, relative_pos, packed, dropout_p))
        if packed is not None:
            return self.out_proj(self._packed(x, rel_embeddings, packed, dropout_p))
        B, T, _ = x.shape
        q, k, v = self._project(x)  # (B, H, T, D) each
        pos_q, pos_k, span = self._positions(rel_embeddings, T)
        if self.recorded is not None:  # output_attentions: the weights kept
            weights = reference_weights(q, k, pos_q, pos_k, relative_pos, span, mask, self.scale)
            self.recorded.append(weights)
            y = dropout(weights, dropout_p) @ v  # (B, H, T, D)
        else:
            y = self._attend(q, k, v, pos_q, pos_k, relative_pos, span, mask, dropout_p)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H * D): heads merged
        return self.out_proj(y)

    def _first(self, x, context, mask, rel_embeddings, relative_pos, packed: PackedRows | None, dropout_p: float):
        """Position 0's attention output before the output projection: (B, 1, H * D), or (B, H * D) packed."""
        if packed is not None:  # keys and values projected packed, then re-padded to (B, T, H * D)
            q = self._project_query(x[:, None])  # (B, H, 1, D)
            N, packing = context.size(0), packed.packing
            k, v = (
                self._heads(packing.pad(t[0].transpose(0, 1).reshape(N, -1)))
                for t in self._project_context(context[None])
            )
            mask = packing.mask[:, 0, 0]  # (B, T)
        else:
            q, (k, v) = self._project_query(x), self._project_context(context)
        pos_q, pos_k, span = self._positions(rel_embeddings, k.size(-2))
        y = first_query_attention(q, k, v, pos_q, pos_k, relative_pos, span, mask, self.scale, dropout_p)
        y = y.transpose(1, 2).flatten(2)  # (B, 1, H * D)
        return y[:, 0] if packed is not None else y

    def _packed(self, x: torch.Tensor, rel_embeddings, packed: PackedRows, dropout_p: float) -> torch.Tensor:
        """(N, C) real tokens -> (N, H * D) attention outputs before the output projection, each row attending
        within itself, group by group, with the relative positions of the group's length."""
        N, packing = x.size(0), packed.packing
        # projected packed (no padding), then back to (N, H * D) rows for the groups' re-padding
        q, k, v = (t[0].transpose(0, 1).reshape(N, -1) for t in self._project(x[None]))  # (N, H * D) x 3
        # the projection of the whole table: every group's distances index into it (v1 keeps 2 * min(T, k) rows)
        pos_q, pos_k, span = self._positions(rel_embeddings, packing.length)
        out = None
        for rows, mask, relative_pos in packed.groups:
            pad = packing.pad if rows is None else rows.pad
            q_g, k_g, v_g = (self._heads(pad(t)) for t in (q, k, v))  # (b, H, L, D)
            y = self._attend(q_g, k_g, v_g, pos_q, pos_k, relative_pos, span, mask, dropout_p)
            y = y.transpose(1, 2).flatten(2)  # (b, L, H * D)
            if rows is None:
                return packing.unpad(y)  # (N, H * D)
            if out is None:
                out = q.new_empty(N, y.size(-1))
            out.index_copy_(0, rows.tokens, rows.unpad(y))
        return out


class DebertaBlock(Block):
    """BERT's post-LN block with disentangled attention: norm(x + attn(x)), then norm(x + mlp(x))."""

    attention_class: ClassVar[type[DisentangledAttention]] = DisentangledAttention

    def __init__(self, config: DebertaV2Config, layer_idx: int):
        super().__init__(config.layer_config(layer_idx), layer_idx)
        self.attn = self.attention_class(config, layer_idx)
        self.dropout = Dropout(config.dropout)  # the block's residual dropout, its mask drawn faster on CPU

    def _forward(self, x, mask, rel_embeddings, relative_pos, packed, context=None):
        def attend(h):
            return self.attn(h, mask, rel_embeddings, relative_pos, packed, context)

        x = self._sublayer(x, self.attn_norm, attend)
        return self._sublayer(x, self.mlp_norm, self.mlp)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        rel_embeddings: torch.Tensor | None = None,
        relative_pos: torch.Tensor | None = None,
        packed: PackedRows | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C); ``mask`` (B, T) 1 for real tokens; the relative embeddings (R, C), positions.
        With ``packed``, x is (N, C) packed real tokens and so is the output. With ``context`` (every position's
        input), x holds position 0's only and so does the output (see :meth:`DisentangledAttention.forward`)."""
        args = (x, mask, rel_embeddings, relative_pos, packed, context)
        if self.gradient_checkpointing and self.training:
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)


class ConvLayer(nn.Module):
    """DeBERTa-v2's n-gram layer: conv over the embeddings, act, added to layer 0's output, LayerNorm, x mask."""

    def __init__(self, config: DebertaV2Config):
        super().__init__()
        k = config.conv_kernel_size
        C = config.hidden_size
        self.conv = nn.Conv1d(C, C, k, padding=(k - 1) // 2, groups=config.conv_groups)
        self.act = activation(config.conv_act)
        self.norm = nn.LayerNorm(C, eps=config.norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(
        self, embedded: torch.Tensor, layer_out: torch.Tensor, mask: torch.Tensor | None, packing: Packing | None = None
    ) -> torch.Tensor:
        """embedded, layer_out: (B, T, C); mask: (B, T) or None -> (B, T, C), zero at padding.

        With ``packing``, embedded and layer_out are (N, C) packed rows and so is the output: the embeddings are
        re-padded with zeros for the convolution, so each row's edges see zeros, as in the padded batch.
        """
        if packing is not None:
            out = packing.unpad(self.conv(packing.pad(embedded).transpose(1, 2)).transpose(1, 2))  # (N, C)
            return self.norm(layer_out + self.act(self.dropout(out)))
        out = self.conv(embedded.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        y = self.norm(layer_out + self.act(self.dropout(out)))
        # HF also zeroes the convolution at padding before the sum; the product below makes that a no-op
        return y if mask is None else y * mask.to(y.dtype)[..., None]


class DebertaV2Embeddings(nn.Module):
    """Tokens (+ absolute positions) (+ segments), projected to C when E != C, LayerNorm, zeroed at padding."""

    def __init__(self, config: DebertaV2Config):
        super().__init__()
        E = config.embedding_size
        self.tokens = nn.Embedding(config.vocab_size, E, padding_idx=config.pad_token_id)
        self.positions = nn.Embedding(config.max_seq_len, E) if config.position_biased_input else None
        self.segments = nn.Embedding(config.type_vocab_size, E) if config.type_vocab_size > 0 else None
        self.proj = Linear(E, config.hidden_size, bias=False) if E != config.hidden_size else None
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) ids (or (B, T, E) embeddings) -> (B, T, C); ``mask`` (B, T) zeroes padding after the norm."""
        x = self.tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.positions is not None:
            if position_ids is None:
                position_ids = torch.arange(x.size(1), device=x.device)[None]  # (1, T)
            x = x + self.positions(position_ids)
        if self.segments is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
            x = x + self.segments(token_type_ids)
        if self.proj is not None:
            x = self.proj(x)  # (B, T, C)
        x = self.norm(x)
        if mask is not None:
            x = x * mask.to(x.dtype)[..., None]
        return self.dropout(x)


# ----------------------------------------------------------------------------------------------
# Checkpoint names

DEBERTA_FROM_HF = {
    "embeddings.word_embeddings.weight": "embed.tokens.weight",
    "embeddings.position_embeddings.weight": "embed.positions.weight",
    "embeddings.token_type_embeddings.weight": "embed.segments.weight",
    "embeddings.embed_proj.weight": "embed.proj.weight",
    **linear_map("embeddings.LayerNorm", "embed.norm"),
    "embeddings.position_ids": None,  # a buffer, rebuilt on the fly
    "encoder.rel_embeddings.weight": "rel_embed.weight",
    **linear_map("encoder.LayerNorm", "rel_norm"),
    **linear_map("encoder.conv.conv", "conv.conv"),
    **linear_map("encoder.conv.LayerNorm", "conv.norm"),
}
for _hf, _ours in [
    ("attention.self.query_proj", "attn.q_proj"),
    ("attention.self.key_proj", "attn.k_proj"),
    ("attention.self.value_proj", "attn.v_proj"),
    ("attention.self.pos_query_proj", "attn.pos_q_proj"),
    ("attention.self.pos_key_proj", "attn.pos_k_proj"),
    ("attention.output.dense", "attn.out_proj"),
    ("attention.output.LayerNorm", "attn_norm"),
    ("intermediate.dense", "mlp.fc_in"),
    ("output.dense", "mlp.fc_out"),
    ("output.LayerNorm", "mlp_norm"),
]:
    for _p in ("weight", "bias"):
        DEBERTA_FROM_HF[f"encoder.layer.{{}}.{_hf}.{_p}"] = f"layers.{{}}.{_ours}.{_p}"

LEGACY_MLM_FROM_HF = {
    **linear_map("cls.predictions.transform.dense", "head.mlm.dense"),
    **linear_map("cls.predictions.transform.LayerNorm", "head.mlm.norm"),
    "cls.predictions.bias": "head.mlm.bias",
    "cls.predictions.decoder.weight": None,  # tied to the token embeddings
    "cls.predictions.decoder.bias": None,  # tied to cls.predictions.bias
}
MLM_FROM_HF = {
    **linear_map("lm_predictions.lm_head.dense", "head.mlm.dense"),
    **linear_map("lm_predictions.lm_head.LayerNorm", "head.mlm.norm"),
    "lm_predictions.lm_head.bias": "head.mlm.bias",
}
POOLER_FROM_HF = linear_map("pooler.dense", "head.pooler.dense")
CLASSIFIER_FROM_HF = linear_map("classifier", "head.classifier")
QA_FROM_HF = linear_map("qa_outputs", "head.qa_outputs")


class DebertaV2PreTrainedModel(PreTrainedModel):
    """Shared by DeBERTa-v2's base model and heads: config class and the checkpoint key map."""

    config_class = DebertaV2Config
    base_key_map = KeyMap(DEBERTA_FROM_HF)
    hf_base_prefix = "deberta."
    # deberta-v3 checkpoints carry absolute position embeddings their config does not use (transformers
    # ignores them too); a model that uses them and a checkpoint that lacks them: newly initialised, as in HF
    optional_base_modules = ("embed.positions.",)

    def parameters_maybe_unused(self) -> list[str]:
        """The relative-position embeddings (and their norm) of a config with relative attention but no position
        term (``pos_att_type`` empty): built, as in ``transformers``, and never read. Distributed training reads
        this (DDP must then look for unused parameters)."""
        if not self.config.relative_attention or self.config.position_terms:
            return []
        return [
            name for name, _ in self.named_parameters() if ".rel_embed." in f".{name}" or ".rel_norm." in f".{name}"
        ]


class DebertaV2Model(DebertaV2PreTrainedModel):
    """The encoder: embeddings, the relative-position table, the blocks, the optional convolution."""

    task = "base"
    hf_architecture = "DebertaV2Model"
    our_base_prefix = ""
    block_class: ClassVar[type[DebertaBlock]] = DebertaBlock

    def __init__(self, config: DebertaV2Config):
        super().__init__(config)
        self.embed = DebertaV2Embeddings(config)
        self.layers = nn.ModuleList([self.block_class(config, i) for i in range(config.num_layers)])
        self.rel_embed = nn.Embedding(2 * config.att_span, config.hidden_size) if config.relative_attention else None
        self.rel_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps) if config.rel_layer_norm else None
        self.conv = ConvLayer(config) if config.conv_kernel_size > 0 else None

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed.tokens

    def relative_embeddings(self) -> torch.Tensor | None:
        """(R, C) the relative-position embeddings every layer projects, normed when ``norm_rel_ebd`` says so."""
        if self.rel_embed is None:
            return None
        rel = self.rel_embed.weight
        return self.rel_norm(rel) if self.rel_norm is not None else rel

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        unpad: bool | None = None,
        first_token_only: bool = False,
    ) -> ModelOutput:
        """Encode a batch (unpadded inside when it is right-padded and ``config.unpad``).

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1 for real tokens, 0 for padding.
            token_type_ids: (B, T) segment ids (ignored when ``type_vocab_size`` is 0).
            position_ids: (B, T) absolute positions (read only with ``position_biased_input``); default 0..T-1.
            inputs_embeds: (B, T, E) instead of ``input_ids``.
            output_hidden_states: also return the embeddings and every layer's output.
            unpad: run on the real tokens only (outputs at padding are then zeros); default ``config.unpad``.
            first_token_only: only position 0 is read, as by the pooler: the last layer computes its query,
                attention and MLP for position 0 alone (keys and values still for every position), and
                ``last_hidden_state`` is (B, 1, C). Not with ``output_hidden_states``. A one-layer model with the
                convolution layer (which adds to layer 0's every position) computes every position anyway.

        Returns:
            ``last_hidden_state`` (B, T, C) and, when asked, ``hidden_states``.
        """
        if first_token_only and output_hidden_states:
            raise ValueError("first_token_only=True cannot return hidden_states: the last layer skips positions")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        ref = input_ids if input_ids is not None else inputs_embeds
        T = ref.size(1)
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        config = self.config
        unpad = config.unpad if unpad is None else unpad
        if self.layers[0].attn.recorded is not None:  # output_attentions: every (B, H, T, T) map, padded layout
            unpad, first_token_only = False, False
        last = len(self.layers) - 1
        first_token_only = first_token_only and not (last == 0 and self.conv is not None)
        packed = PackedRows.from_mask(mask, config) if mask is not None and unpad and right_padded(mask) else None
        relative_pos = None
        if config.relative_attention and (packed is None or first_token_only):
            relative_pos = relative_positions(T, config.position_buckets, config.max_relative, ref.device)  # (T, T)
        rel = self.relative_embeddings()
        packing = None
        if packed is not None:
            packing = packed.packing
            input_ids, token_type_ids, position_ids, inputs_embeds = self._pack_inputs(
                packing, input_ids, token_type_ids, position_ids, inputs_embeds
            )
            mask = None  # the packing carries its own
        embedded = self.embed(input_ids, token_type_ids, position_ids, inputs_embeds, mask)  # (B, T, C) or (N, C)
        x = embedded
        hidden = [x] if output_hidden_states else None
        for i, block in enumerate(self.layers):
            if first_token_only and i == last:
                first = x[:, :1] if packing is None else x[packing.cu_seqlens[:-1].long()]  # (B, 1, C) or (B, C)
                x = block(first, mask, rel, relative_pos, packed, context=x)
            else:
                x = block(x, mask, rel, relative_pos, packed)
            if i == 0 and self.conv is not None:
                x = self.conv(embedded, x, mask, packing)
            if hidden is not None:
                hidden.append(x)
        if packing is not None and first_token_only:
            x = x[:, None]  # (B, 1, C)
        elif packing is not None:
            x = packing.pad(x)  # (B, T, C)
            hidden = [packing.pad(h) for h in hidden] if hidden is not None else None
        return ModelOutput(last_hidden_state=x, hidden_states=tuple(hidden) if hidden is not None else None)

    def _pack_inputs(self, packing: Packing, input_ids, token_type_ids, position_ids, inputs_embeds):
        """The real tokens' ids, segments, positions (N,) and embeddings (N, E), defaults filled in on (B, T) first."""
        ref = input_ids if input_ids is not None else inputs_embeds
        if position_ids is None:
            position_ids = torch.arange(ref.size(1), device=ref.device)[None]  # (1, T)
        return packing.unpad_inputs(input_ids, token_type_ids, position_ids, inputs_embeds)


# ----------------------------------------------------------------------------------------------
# Heads


class DebertaV2MLMHead(bert.BertMLMHead):
    """BERT's MLM head (dense -> act -> LayerNorm -> tokens^T + bias), mapping C -> E when E != C."""

    def __init__(self, config: DebertaV2Config, embedding: nn.Embedding):
        super().__init__(config, embedding)
        E = embedding.embedding_dim
        if E != config.hidden_size:
            if not config.legacy:
                raise ValueError(
                    f"embedding_size {E} != hidden_size {config.hidden_size} needs legacy=True: the lm_predictions "
                    "head multiplies C-wide states by the E-wide embedding matrix (transformers cannot run it either)"
                )
            self.dense = Linear(config.hidden_size, E)
            self.norm = nn.LayerNorm(E, eps=config.norm_eps)


class ContextPooler(nn.Module):
    """act(W dropout(h_[CLS]) + b): the sentence vector DeBERTa's sequence and choice heads read."""

    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.dropout = Dropout(config.pooler_dropout)
        self.dense = Linear(config.pooler_hidden_size, config.pooler_hidden_size)
        self.act = activation(config.pooler_hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(self.dropout(hidden[:, 0])))


def deberta_sequence_loss(config: DebertaV2Config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DeBERTa's sequence-classification loss, which differs from BERT's only when ``problem_type`` is unset.

    Unset, as ``transformers``' DeBERTa does: one label is regression (MSE); (B,) labels are class ids and rows with
    a negative id are left out (a zero loss when none is left); (B, L) labels are soft targets (cross-entropy
    against the distribution). Set, the shared rule (:func:`~bunmyaku.models.heads.sequence_classification_loss`).
    """
    if config.problem_type is not None:
        return sequence_classification_loss(config, logits, labels)
    if config.num_labels == 1:
        return F.mse_loss(logits.view(-1).to(labels.dtype), labels.view(-1))
    if labels.dim() == 1 or labels.size(-1) == 1:
        labels = labels.view(-1).long()
        kept = labels >= 0
        if not bool(kept.any()):
            return logits.new_zeros(())
        return F.cross_entropy(logits[kept].float(), labels[kept])
    return -(logits.log_softmax(-1) * labels).sum(-1).mean()


class _DebertaHeadModel(DebertaV2PreTrainedModel):
    """A head on top of ``self.backbone``; subclasses set the key map and build ``self.head``."""

    base_class: ClassVar[type[DebertaV2Model]] = DebertaV2Model
    # the positions a head's loss reads: "labelled" (those its (B, T) labels score), "all" (QA: a softmax over every
    # position, padding included), "first" (the pooled first token)
    reads: ClassVar[str] = "labelled"

    def __init__(self, config: DebertaV2Config):
        super().__init__(config)
        self.backbone = self.base_class(config)
        self.head = nn.Module()

    def _encode(
        self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_hidden_states, labels=None
    ) -> ModelOutput:
        """The backbone's output; padded where the loss reads padding positions, so that it is HF's loss."""
        reads_padding = False
        if labels is not None and attention_mask is not None and self.reads != "first":
            reads_padding = self.reads == "all" or bool(((labels != -100) & (attention_mask == 0)).any())
        return self.backbone(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_hidden_states,
            unpad=False if reads_padding else None,
            first_token_only=self.reads == "first" and not output_hidden_states,
        )

    def _classifier_dropout(self) -> Dropout:
        p = self.config.cls_dropout
        return Dropout(self.config.dropout if p is None else p)


class DebertaV2ForMaskedLM(_DebertaHeadModel):
    """Masked language modelling; the head's tensors are named as ``config.legacy`` says, either name loads."""

    task = "masked-lm"
    hf_architecture = "DebertaV2ForMaskedLM"
    head_key_map = KeyMap({**MLM_FROM_HF, **LEGACY_MLM_FROM_HF})  # loading: either layout

    def __init__(self, config: DebertaV2Config):
        super().__init__(config)
        self.head.mlm = DebertaV2MLMHead(config, self.backbone.embed.tokens)

    def _ours_to_hf(self, our_key: str) -> str:
        """Saving: the head's tensors under the layout ``config.legacy`` names, which is the one HF builds."""
        if self._is_head(our_key):
            return KeyMap(LEGACY_MLM_FROM_HF if self.config.legacy else MLM_FROM_HF).to_hf(our_key)
        return super()._ours_to_hf(our_key)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        masked_only: bool = False,
    ) -> ModelOutput:
        """``labels``: (B, T) original ids at masked positions, -100 elsewhere. Returns logits (B, T, V).

        With ``masked_only`` (needs ``labels``), the vocabulary projection runs only where ``labels`` != -100:
        logits are then (M, V), one row per masked position in row-major order.
        """
        out = self._encode(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_hidden_states, labels
        )
        hidden, labels = bert._masked_positions(out.last_hidden_state, labels, masked_only)
        logits = self.head.mlm(hidden)
        loss = token_loss(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class DebertaV2ForSequenceClassification(_DebertaHeadModel):
    """A linear classifier on the pooled first token: single-label, multi-label, soft-label or regression."""

    task = "sequence-classification"
    hf_architecture = "DebertaV2ForSequenceClassification"
    reads = "first"
    head_key_map = KeyMap({**POOLER_FROM_HF, **CLASSIFIER_FROM_HF})
    num_outputs: ClassVar[int | None] = None  # None: num_labels

    def __init__(self, config: DebertaV2Config):
        super().__init__(config)
        self.head.pooler = ContextPooler(config)
        self.head.dropout = self._classifier_dropout()
        self.head.classifier = Linear(config.hidden_size, self.num_outputs or config.num_labels)

    def _classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, L): pool the first token, dropout, linear."""
        return self.head.classifier(self.head.dropout(self.head.pooler(hidden)))

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """Returns logits (B, L). ``labels``: (B,) ids, (B,) floats (regression), (B, L) multi-hot or soft."""
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_hidden_states)
        logits = self._classify(out.last_hidden_state)
        loss = deberta_sequence_loss(self.config, logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class DebertaV2ForTokenClassification(_DebertaHeadModel):
    """A linear classifier on every token (NER, tagging); its dropout is the hidden dropout (as in HF)."""

    task = "token-classification"
    hf_architecture = "DebertaV2ForTokenClassification"
    head_key_map = KeyMap(CLASSIFIER_FROM_HF)

    def __init__(self, config: DebertaV2Config):
        super().__init__(config)
        self.head.dropout = Dropout(config.dropout)
        self.head.classifier = Linear(config.hidden_size, config.num_labels)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """Returns logits (B, T, L). ``labels``: (B, T) tag ids, -100 on positions not scored."""
        out = self._encode(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_hidden_states, labels
        )
        logits = self.head.classifier(self.head.dropout(out.last_hidden_state))
        loss = token_loss(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class DebertaV2ForQuestionAnswering(_DebertaHeadModel):
    """Extractive QA: a start score and an end score for every token (padding positions as HF computes them)."""

    task = "question-answering"
    hf_architecture = "DebertaV2ForQuestionAnswering"
    reads = "all"
    head_key_map = KeyMap(QA_FROM_HF)

    def __init__(self, config: DebertaV2Config):
        super().__init__(config)
        self.head.qa_outputs = Linear(config.hidden_size, 2)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """Returns ``start_logits`` and ``end_logits`` (B, T); loss when both positions (B,) are given."""
        positions = start_positions  # any label: the span loss is a softmax over every position
        out = self._encode(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_hidden_states, positions
        )
        start_logits, end_logits = self.head.qa_outputs(out.last_hidden_state).unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = span_loss(start_logits, end_logits, start_positions, end_positions)
        return ModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits, hidden_states=out.hidden_states)


class DebertaV2ForMultipleChoice(DebertaV2ForSequenceClassification):
    """Multiple choice: each (context, choice) pair is encoded, pooled and scored by one linear output."""

    task = "multiple-choice"
    hf_architecture = "DebertaV2ForMultipleChoice"
    num_outputs = 1

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """Inputs are (B, N, T) (embeddings (B, N, T, E)); returns logits (B, N); ``labels``: (B,) the right choice."""
        ref = input_ids if input_ids is not None else inputs_embeds
        B, N = ref.shape[:2]

        flat = flatten_choices(B, N, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        out = self._encode(*flat, output_hidden_states)
        logits = self._classify(out.last_hidden_state).view(B, N)
        loss = F.cross_entropy(logits, labels.view(-1)) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


TASKS: dict[str, type[DebertaV2PreTrainedModel]] = {
    cls.task: cls
    for cls in (
        DebertaV2Model,
        DebertaV2ForMaskedLM,
        DebertaV2ForSequenceClassification,
        DebertaV2ForTokenClassification,
        DebertaV2ForQuestionAnswering,
        DebertaV2ForMultipleChoice,
    )
}
