"""Longformer (Beltagy et al. 2020): RoBERTa whose self-attention is a sliding window plus global tokens.

Notation: B batch, T sequence length, C hidden size, H heads, D head dim, G global tokens (the most of any row),
V vocabulary, L labels.

What differs from RoBERTa, and nothing else:
- each layer's attention sees ``attention_window[layer] // 2`` tokens on each side (a per-layer window), plus the
  global tokens (``global_attention_mask``); global tokens see every token. Time and memory grow linearly in T
  (:mod:`bunmyaku.models.sparse_attention`), so one sequence can be as long as the position table (4,096);
- global queries, and the keys and values they read, have their own projections (``query_global``,
  ``key_global``, ``value_global``, §3.1: "we use two sets of projections"): their rows are computed apart and
  replace the local rows of the global tokens. Local queries read global tokens through the ordinary keys. With
  fewer global tokens than head dims, global queries score the inputs directly instead of projecting every token
  (:meth:`LongformerSelfAttention._global_rows_through_inputs`), the same numbers for a fraction of the work;
- the heads set global attention where the paper does when the caller gives none: on ``<s>`` for sequence
  classification, on the question (every token before the first ``</s>``) for question answering.

``transformers`` pads every batch to a multiple of the largest window because its chunked attention needs whole
chunks; here only attention pads (to its block size, inside :func:`sparse_attention`), so the embeddings and MLPs
never run on that padding. The outputs are the same: padding keys are masked either way.

    input_ids, global_attention_mask
        -> RoBERTa embeddings -> num_layers x post-LN Block (window + global attention, GELU MLP)
        -> last_hidden_state (B, T, C); pooler: tanh(W h[<s>]) (B, C)

Heads: masked LM, sequence classification, token classification, extractive QA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bunmyaku.hub import KeyMap
from bunmyaku.hub.keymap import linear_map
from bunmyaku.models import bert, roberta
from bunmyaku.models.base import ModelOutput, PreTrainedModel
from bunmyaku.models.heads import sequence_classification_loss, span_loss, token_loss
from bunmyaku.models.layers import Block
from bunmyaku.models.linear import Linear
from bunmyaku.models.sparse_attention import SparsePattern, global_query_attention, sparse_attention


@dataclass
class LongformerConfig(roberta.RobertaConfig):
    """Longformer hyper-parameters; defaults are HF's ``LongformerConfig`` (longformer-base-4096 sets its own)."""

    model_type: ClassVar[str] = "longformer"

    vocab_size: int = 30522
    max_seq_len: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    sep_token_id: int | None = 2
    attention_window: list[int] | int = field(default=512)  # two-sided, even: one entry per layer, or one for all

    def __post_init__(self) -> None:
        super().__post_init__()
        windows = self.attention_window
        if isinstance(windows, int):
            windows = [windows] * self.num_layers
        windows = list(windows)
        if len(windows) != self.num_layers:
            raise ValueError(
                f"attention_window has {len(windows)} entries, expected one per layer (num_hidden_layers "
                f"{self.num_layers}) or a single int"
            )
        for layer, w in enumerate(windows):
            if not isinstance(w, int) or w <= 0 or w % 2:
                raise ValueError(f"attention_window[{layer}] = {w!r}: expected a positive even int (two-sided)")
        self.attention_window = windows


class LongformerSelfAttention(nn.Module):
    """Window + global attention with two sets of projections, then the output projection: (B, T, C) -> (B, T, C)."""

    def __init__(self, config: LongformerConfig, layer_idx: int):
        super().__init__()
        C, H = config.hidden_size, config.num_heads
        self.num_heads, self.head_dim = H, C // H
        self.window = config.attention_window[layer_idx] // 2  # one-sided
        self.dropout = config.attention_dropout
        self.q_proj, self.k_proj, self.v_proj = Linear(C, C), Linear(C, C), Linear(C, C)
        self.q_global, self.k_global, self.v_global = Linear(C, C), Linear(C, C), Linear(C, C)
        self.out_proj = Linear(C, C)

    def forward(self, x: torch.Tensor, patterns: dict[int, SparsePattern], *_: Any, **__: Any) -> torch.Tensor:
        """``patterns``: the batch's pattern per one-sided window (:class:`Block` passes it as its ``mask``)."""
        B, T, C = x.shape
        H, D = self.num_heads, self.head_dim
        pattern = patterns[self.window]
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        v = self.v_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        dropout_p = self.dropout if self.training else 0.0
        global_out = None
        if pattern.is_global is not None:
            index = pattern.global_slots()[0]  # (B, G)
            G = index.size(1)
            x_global = x.gather(1, index[:, :, None].expand(B, G, C))  # (B, G, C)
            q_global = self.q_global(x_global).view(B, G, H, D).transpose(1, 2)  # (B, H, G, D)
            # the shortcut reads the key and value weights: a wrapped (LoRA) or quantized projection runs as a module
            if G < D and type(self.k_global) is Linear and type(self.v_global) is Linear:
                global_out = self._global_rows_through_inputs(x, q_global, pattern.valid, dropout_p)
            else:
                k_global = self.k_global(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
                v_global = self.v_global(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
                global_out = global_query_attention(q_global, k_global, v_global, pattern.valid, dropout_p)
        y = sparse_attention(q, k, v, pattern, dropout_p=dropout_p, global_out=global_out)  # (B, H, T, D)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))

    def _global_rows_through_inputs(
        self, x: torch.Tensor, q_global: torch.Tensor, valid: torch.Tensor | None, dropout_p: float
    ) -> torch.Tensor:
        """The global rows without projecting every token by ``key_global`` and ``value_global``: (B, H, G, D).

        With W_k, b_k the key projection of one head, q . (W_k x + b_k) = (W_k^T q) . x + q . b_k, and q . b_k is the
        same for every key, so it cancels in the softmax; with W_v, b_v the value projection and p weights summing to
        1, sum_t p_t (W_v x_t + b_v) = W_v (sum_t p_t x_t) + b_v. So each global query scores the inputs x directly,
        and the values are projected once per query: 2 H G T C multiply-adds instead of the 2 T C^2 of projecting
        every token, fewer whenever G < D (one <s> token, or a short question).
        """
        B, T, C = x.shape
        H, D, G = self.num_heads, self.head_dim, q_global.size(2)
        w_k = self.k_global.weight.view(H, D, C)
        w_v = self.v_global.weight.view(H, D, C)
        u = (q_global @ w_k).reshape(B, H * G, C) / math.sqrt(D)  # (B, H * G, C): each query mapped to input space
        scores = u @ x.transpose(1, 2)  # (B, H * G, T)
        if valid is not None:
            scores = scores.masked_fill(~valid[:, None, :], torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1, dtype=torch.float32).to(x.dtype)
        if dropout_p > 0:
            weights = F.dropout(weights, p=dropout_p)
        z = (weights @ x).view(B, H, G, C)  # (B, H, G, C): the weighted inputs
        return z @ w_v.transpose(1, 2) + self.v_global.bias.view(H, 1, D)  # (B, H, G, D)


class LongformerBlock(Block):
    """RoBERTa's post-LN block with Longformer's attention; ``mask`` is the batch's patterns."""

    def __init__(self, config: LongformerConfig, layer_idx: int):
        super().__init__(config.layer_config(layer_idx), layer_idx)
        self.attn = LongformerSelfAttention(config, layer_idx)


LONGFORMER_FROM_HF = {k: v for k, v in bert.BERT_FROM_HF.items() if k != "embeddings.token_type_ids"}
for _hf, _ours in [("query_global", "q_global"), ("key_global", "k_global"), ("value_global", "v_global")]:
    for _p in ("weight", "bias"):
        LONGFORMER_FROM_HF[f"encoder.layer.{{}}.attention.self.{_hf}.{_p}"] = f"layers.{{}}.attn.{_ours}.{_p}"


class LongformerPreTrainedModel(PreTrainedModel):
    """Shared by Longformer's base model and heads: config class and the checkpoint key map."""

    config_class = LongformerConfig
    base_key_map = KeyMap(LONGFORMER_FROM_HF)
    hf_base_prefix = "longformer."
    optional_base_modules = ("pooler.",)

    def parameters_maybe_unused(self) -> list[str]:
        """The global projections: a batch without global tokens (masked LM, tagging, unless the caller sets some)
        never uses them, and global rows scored through the inputs never use ``k_global``'s bias (it adds the same
        number to every score of a query). Distributed training reads this (DDP must then look for them)."""
        return [name for name, _ in self.named_parameters() if any(f"attn.{p}_global." in name for p in "qkv")]

    def __call__(self, *args: Any, output_attentions: bool = False, **kwargs: Any) -> Any:
        if output_attentions:
            raise ValueError("output_attentions is not supported for Longformer: its weights are never a (T, T) map")
        return super().__call__(*args, **kwargs)


class LongformerModel(LongformerPreTrainedModel):
    """The encoder: RoBERTa's embeddings, window + global blocks and (optionally) the pooler.

    Args:
        config: the hyper-parameters.
        add_pooler: build the ``<s>`` pooler (heads that read every position do without).
    """

    task = "base"
    hf_architecture = "LongformerModel"
    our_base_prefix = ""

    def __init__(self, config: LongformerConfig, add_pooler: bool = True):
        super().__init__(config)
        self.embed = roberta.RobertaEmbeddings(config)
        self.layers = nn.ModuleList([LongformerBlock(config, i) for i in range(config.num_layers)])
        self.pooler = bert.BertPooler(config) if add_pooler else None

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed.tokens

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        global_attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """Encode a batch.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1 for real tokens, 0 for padding.
            global_attention_mask: (B, T) 1 for tokens that attend to, and are attended by, every token.
            token_type_ids: (B, T) segment ids.
            position_ids: (B, T); default counted from ``pad_token_id + 1`` over real tokens, as RoBERTa.
            inputs_embeds: (B, T, C) instead of ``input_ids``.
            output_hidden_states: also return the embeddings and every layer's output.

        Returns:
            ``last_hidden_state`` (B, T, C), ``pooler_output`` (B, C) when the pooler exists, ``hidden_states``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        # one pattern per distinct window, shared by the layers that use it
        patterns = {
            w: SparsePattern.from_masks(w, attention_mask, global_attention_mask)
            for w in {layer.attn.window for layer in self.layers}
        }
        x = self.embed(input_ids, token_type_ids, position_ids, inputs_embeds)  # (B, T, C)
        hidden = [x] if output_hidden_states else None
        for block in self.layers:
            x = block(x, patterns)
            if hidden is not None:
                hidden.append(x)
        return ModelOutput(
            last_hidden_state=x,
            pooler_output=self.pooler(x) if self.pooler is not None else None,
            hidden_states=tuple(hidden) if hidden is not None else None,
        )


def question_global_mask(input_ids: torch.Tensor, sep_token_id: int) -> torch.Tensor:
    """(B, T) 1 on every token before each row's first ``sep_token_id``: the question of ``<s> q </s></s> c </s>``.

    Raises:
        ValueError: a row without that token.
    """
    is_sep = input_ids == sep_token_id
    has_sep = is_sep.any(-1)
    if not bool(has_sep.all()):
        rows = (~has_sep).nonzero().flatten().tolist()
        raise ValueError(
            f"rows {rows} have no separator token (id {sep_token_id}), so the question cannot be found for global "
            "attention; pass global_attention_mask, or encode question and context as a pair"
        )
    first_sep = is_sep.long().argmax(-1)  # (B,)
    return (torch.arange(input_ids.size(1), device=input_ids.device)[None] < first_sep[:, None]).long()


class _LongformerHeadModel(LongformerPreTrainedModel):
    """A head on top of ``self.backbone``; subclasses set the key map and build ``self.head``."""

    add_pooler: ClassVar[bool] = False

    def __init__(self, config: LongformerConfig):
        super().__init__(config)
        self.backbone = LongformerModel(config, add_pooler=self.add_pooler)
        self.head = nn.Module()

    def default_global_mask(self, input_ids: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        """The global attention a head sets when the caller gives none: none by default."""
        return None

    def _encode(
        self, input_ids, attention_mask, global_attention_mask, token_type_ids, position_ids, inputs_embeds, hidden
    ) -> ModelOutput:
        if global_attention_mask is None:
            global_attention_mask = self.default_global_mask(
                input_ids, input_ids if input_ids is not None else inputs_embeds[..., 0]
            )
        return self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            global_attention_mask=global_attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=hidden,
        )


class LongformerForMaskedLM(_LongformerHeadModel):
    """Masked language modelling with RoBERTa's LM head (tied to the token embeddings)."""

    task = "masked-lm"
    hf_architecture = "LongformerForMaskedLM"
    head_key_map = KeyMap(roberta.LM_FROM_HF)

    def __init__(self, config: LongformerConfig):
        super().__init__(config)
        self.head.mlm = roberta.RobertaMLMHead(config, self.backbone.embed.tokens)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        global_attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """``labels``: (B, T) original ids at masked positions, -100 elsewhere. Returns logits (B, T, V)."""
        out = self._encode(
            input_ids,
            attention_mask,
            global_attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_hidden_states,
        )
        logits = self.head.mlm(out.last_hidden_state)
        loss = token_loss(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class LongformerForSequenceClassification(_LongformerHeadModel):
    """RoBERTa's classifier MLP on ``<s>``, which is global by default: it reads the whole document."""

    task = "sequence-classification"
    hf_architecture = "LongformerForSequenceClassification"
    head_key_map = KeyMap(roberta.CLASSIFIER_FROM_HF)

    def __init__(self, config: LongformerConfig):
        super().__init__(config)
        self.head.classifier = roberta.RobertaClassificationHead(config)
        self.head.classifier.dropout.p = config.dropout  # HF's Longformer ignores classifier_dropout here

    def default_global_mask(self, input_ids, like):
        mask = torch.zeros(like.shape[:2], dtype=torch.long, device=like.device)
        mask[:, 0] = 1  # <s>
        return mask

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        global_attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """Returns logits (B, L). ``labels``: (B,) ids, (B,) floats (regression) or (B, L) multi-hot."""
        out = self._encode(
            input_ids,
            attention_mask,
            global_attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_hidden_states,
        )
        logits = self.head.classifier(out.last_hidden_state)
        loss = sequence_classification_loss(self.config, logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class LongformerForTokenClassification(_LongformerHeadModel):
    """A linear classifier on every token (NER, tagging); no global tokens unless given."""

    task = "token-classification"
    hf_architecture = "LongformerForTokenClassification"
    head_key_map = KeyMap(linear_map("classifier", "head.classifier"))

    def __init__(self, config: LongformerConfig):
        super().__init__(config)
        self.head.dropout = nn.Dropout(config.dropout)  # HF's Longformer ignores classifier_dropout here
        self.head.classifier = Linear(config.hidden_size, config.num_labels)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        global_attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """Returns logits (B, T, L). ``labels``: (B, T) tag ids, -100 on positions not scored."""
        out = self._encode(
            input_ids,
            attention_mask,
            global_attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_hidden_states,
        )
        logits = self.head.classifier(self.head.dropout(out.last_hidden_state))
        loss = token_loss(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class LongformerForQuestionAnswering(_LongformerHeadModel):
    """Extractive QA; the question's tokens are global by default (found from the first ``</s>``)."""

    task = "question-answering"
    hf_architecture = "LongformerForQuestionAnswering"
    head_key_map = KeyMap(bert.QA_FROM_HF)

    def __init__(self, config: LongformerConfig):
        super().__init__(config)
        self.head.qa_outputs = Linear(config.hidden_size, 2)

    def default_global_mask(self, input_ids, like):
        if input_ids is None:
            raise ValueError("question answering with inputs_embeds needs global_attention_mask (the question tokens)")
        return question_global_mask(input_ids, self.config.sep_token_id)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        global_attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """Returns ``start_logits`` and ``end_logits`` (B, T); loss when both positions (B,) are given."""
        out = self._encode(
            input_ids,
            attention_mask,
            global_attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_hidden_states,
        )
        start_logits, end_logits = self.head.qa_outputs(out.last_hidden_state).unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = span_loss(start_logits, end_logits, start_positions, end_positions)
        return ModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits, hidden_states=out.hidden_states)


TASKS: dict[str, type[LongformerPreTrainedModel]] = {
    cls.task: cls
    for cls in (
        LongformerModel,
        LongformerForMaskedLM,
        LongformerForSequenceClassification,
        LongformerForTokenClassification,
        LongformerForQuestionAnswering,
    )
}
