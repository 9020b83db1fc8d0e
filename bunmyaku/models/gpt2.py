"""GPT-2 (Radford et al. 2019): a pre-LN Transformer decoder with learned positions and a tied LM head.

Notation: B batch, T new positions, S cached + new positions, C hidden size, V vocabulary, N choices, L labels.

    input_ids, positions
        -> tokens + positions (+ token types, read from the token table) -> dropout   (GPT2Embeddings)
        -> num_layers x pre-LN Block (causal self-attention, MLP)                      (layers.Block)
        -> final LayerNorm -> last_hidden_state (B, T, C)
        -> h @ tokens^T -> logits (B, T, V)                                            (the tied LM head)

GPT-2 §2.3 moved GPT's LayerNorm to the input of each sub-block and added one after the last block::

    x = x + attn(ln_1(x))        (causal: position t sees positions <= t)
    x = x + mlp(ln_2(x))
    ...
    h = ln_f(x)

Heads: causal LM, sequence classification (on the last real token), token classification, extractive QA,
and GPT's fine-tuning recipe (Radford et al. 2018 §3.3, "double heads"): each choice is written as
``start context delimiter answer extract``, the LM loss stays as an auxiliary objective, and a linear layer
scores the hidden state of the final ``extract`` token.

Left padding is the normal case for a decoder: positions default to counting real tokens only, so a
left-padded row gives the same outputs as the same row alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bunmyaku.hub import KeyMap
from bunmyaku.hub.keymap import linear_map
from bunmyaku.models.attention import KVCache, causal_mask, positions_from_mask
from bunmyaku.models.base import GenerationMixin, ModelOutput, PreTrainedModel
from bunmyaku.models.config import LayerConfig, ModelConfig
from bunmyaku.models.heads import (
    causal_lm_output,
    check_logits_to_keep,
    flatten_choices,
    sequence_classification_loss,
    shifted_lm_loss,
    span_loss,
    token_loss,
)
from bunmyaku.models.layers import Block, activation, lm_head
from bunmyaku.models.linear import Linear

SUMMARY_TYPES = ("last", "first", "mean", "cls_index")


@dataclass
class GPT2Config(ModelConfig):
    """GPT-2 hyper-parameters; defaults are the 124M "gpt2" checkpoint."""

    model_type: ClassVar[str] = "gpt2"
    HF_NAMES: ClassVar[dict[str, str]] = {
        "hidden_size": "n_embd",
        "num_layers": "n_layer",
        "num_heads": "n_head",
        "max_seq_len": "n_positions",
        "intermediate_size": "n_inner",
        "hidden_act": "activation_function",
        "dropout": "resid_pdrop",
        "embd_dropout": "embd_pdrop",
        "attention_dropout": "attn_pdrop",
        "norm_eps": "layer_norm_epsilon",
    }
    vocab_size: int = 50257
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int | None = None  # None means 4 * hidden_size
    hidden_act: str = "gelu_new"
    dropout: float = 0.1  # on each sub-block's output, before the residual sum
    embd_dropout: float = 0.1  # on tokens + positions
    attention_dropout: float = 0.1
    max_seq_len: int = 1024
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True  # False: softmax(QK^T) without 1 / sqrt(D)
    # Stanford CRFM's Mistral tricks for stable mixed-precision training: divide layer i's scores by i + 1, and
    # compute the scores and their softmax in fp32 (upcast_reordered_attention; eager path only, as in HF).
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    add_cross_attention: bool = False
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True
    classifier_dropout: float | None = None  # token classification; None means 0.1, as in HF
    # the double-heads model's choice scorer (GPT2DoubleHeadsModel's SequenceSummary)
    summary_type: str = "cls_index"  # last | first | mean | cls_index (the hidden state at mc_token_ids)
    summary_use_proj: bool = True
    summary_activation: str | None = None
    summary_proj_to_labels: bool = True  # project to one score per choice, else to hidden_size
    summary_first_dropout: float = 0.1
    summary_last_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size (n_embd) {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.add_cross_attention:
            raise ValueError("add_cross_attention=True: GPT-2 with cross-attention is not supported")
        if self.summary_type not in SUMMARY_TYPES:
            raise ValueError(f"summary_type {self.summary_type!r}: expected one of {SUMMARY_TYPES}")
        activation(self.hidden_act)
        if self.summary_activation is not None:
            activation(self.summary_activation)

    def layer_config(self, layer_idx: int) -> LayerConfig:
        """What block ``layer_idx`` reads: pre-LN (x + f(norm(x))), LayerNorm, a GELU MLP, biases everywhere, and
        the layer's attention scale (see :func:`attention_scale`)."""
        return LayerConfig(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            pre_norm=True,
            norm_eps=self.norm_eps,
            attention_scale=attention_scale(self, layer_idx),
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            attn_implementation=self.attn_implementation,
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict, written as HF writes it.

        ``n_inner`` is null (HF's default) when it is 4 * n_embd; ``classifier_dropout`` and ``summary_last_dropout``,
        which HF's heads read but its GPT2Config does not declare, only when they are set.
        """
        out = super().to_hf()
        if self.intermediate_size == 4 * self.hidden_size:
            out["n_inner"] = None
        if self.classifier_dropout is None:
            del out["classifier_dropout"]
        if not self.summary_last_dropout:
            del out["summary_last_dropout"]
        return out


def attention_scale(config: GPT2Config, layer_idx: int) -> float | None:
    """The factor on layer ``layer_idx``'s attention scores; None for the usual 1 / sqrt(D)."""
    if config.scale_attn_weights and not config.scale_attn_by_inverse_layer_idx:
        return None
    scale = (config.hidden_size // config.num_heads) ** -0.5 if config.scale_attn_weights else 1.0
    return scale / (layer_idx + 1) if config.scale_attn_by_inverse_layer_idx else scale


def upcast_reordered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention for ``reorder_and_upcast_attn`` (Stanford CRFM's Mistral): fp16 / bf16 inputs, fp32 scores.

    QK^T is computed in float32 with autocast off and the scale inside the product ("reordered": no half-precision
    scores to overflow before they are scaled), the softmax in float32; only the weights go back to V's dtype.
    Arguments and result as in :func:`bunmyaku.models.attention.eager_attention` (one K/V head per query head).
    """
    scale = q.size(-1) ** -0.5 if scale is None else scale
    with torch.autocast(q.device.type, enabled=False):
        scores = torch.matmul(q.float() * scale, k.float().transpose(-2, -1))  # (B, H, T, S) in fp32
    if is_causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1).to(v.dtype)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v  # (B, H, T, D)


class GPT2Embeddings(nn.Module):
    """Token + learned position embeddings, then dropout (no LayerNorm: each block normalises its input)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.positions = nn.Embedding(config.max_seq_len, config.hidden_size)
        self.dropout = nn.Dropout(config.embd_dropout)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) ids (or (B, T, C) embeddings) and (B or 1, T) positions -> (B, T, C)."""
        x = self.tokens(input_ids) if inputs_embeds is None else inputs_embeds
        x = x + self.positions(position_ids)
        if token_type_ids is not None:
            # GPT-2 has no segment table: segment ids are looked up among the tokens (e.g. a delimiter's id).
            x = x + self.tokens(token_type_ids)
        return self.dropout(x)


class SequenceSummary(nn.Module):
    """The double-heads choice scorer: one hidden state per choice -> dropout -> proj -> activation -> dropout."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.summary_type = config.summary_type
        self.first_dropout = nn.Dropout(config.summary_first_dropout)
        # one score per choice (HF forces num_labels = 1 for this model), or a hidden_size summary
        out_dim = 1 if config.summary_proj_to_labels else config.hidden_size
        self.proj = Linear(config.hidden_size, out_dim) if config.summary_use_proj else nn.Identity()
        self.act = activation(config.summary_activation) if config.summary_activation else None
        self.last_dropout = nn.Dropout(config.summary_last_dropout)

    def forward(self, hidden: torch.Tensor, cls_index: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: (B, N, T, C); cls_index: (B, N) positions to read (default the last) -> (B, N, 1 or C)."""
        if self.summary_type == "first":
            h = hidden[..., 0, :]
        elif self.summary_type == "mean":
            h = hidden.mean(dim=-2)
        elif self.summary_type == "last" or cls_index is None:
            h = hidden[..., -1, :]
        else:
            index = cls_index[..., None, None].expand(*cls_index.shape, 1, hidden.size(-1))  # (B, N, 1, C)
            h = hidden.gather(-2, index).squeeze(-2)  # (B, N, C)
        h = self.proj(self.first_dropout(h))
        if self.act is not None:
            h = self.act(h)
        return self.last_dropout(h)


# ----------------------------------------------------------------------------------------------
# Checkpoint conversion

GPT2_FROM_HF: dict[str, str | None] = {
    "wte.weight": "embed.tokens.weight",
    "wpe.weight": "embed.positions.weight",
    "ln_f.weight": "norm.weight",
    "ln_f.bias": "norm.bias",
    "h.{}.attn.bias": None,  # old checkpoints store the causal mask as a buffer; we build masks on the fly
    "h.{}.attn.masked_bias": None,
}
for _hf, _ours in [
    ("ln_1", "attn_norm"),
    ("attn.c_proj", "attn.out_proj"),
    ("ln_2", "mlp_norm"),
    ("mlp.c_fc", "mlp.fc_in"),
    ("mlp.c_proj", "mlp.fc_out"),
]:
    for _p in ("weight", "bias"):
        GPT2_FROM_HF[f"h.{{}}.{_hf}.{_p}"] = f"layers.{{}}.{_ours}.{_p}"
for _part in "qkv":  # the thirds of the fused c_attn, as split by GPT2PreTrainedModel.preprocess_hf
    for _p in ("weight", "bias"):
        GPT2_FROM_HF[f"h.{{}}.attn.c_attn.{_p}[{_part}]"] = f"layers.{{}}.attn.{_part}_proj.{_p}"


LM_FROM_HF = {"lm_head.weight": "head.lm_head.weight"}  # absent from checkpoints when tied to wte
SCORE_FROM_HF = {"score.weight": "head.score.weight"}  # no bias
CLASSIFIER_FROM_HF = linear_map("classifier", "head.classifier")
QA_FROM_HF = linear_map("qa_outputs", "head.qa_outputs")
SUMMARY_FROM_HF = linear_map("multiple_choice_head.summary", "head.summary.proj")

# OpenAI's checkpoints come from TensorFlow, where these projections are 1x1 convolutions ("Conv1D") that store
# their weight as (in, out): the transpose of nn.Linear's (out, in).
_CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
_FUSED_QKV = (".attn.c_attn.weight", ".attn.c_attn.bias")


class GPT2PreTrainedModel(PreTrainedModel):
    """Shared by GPT-2's base model and heads: config class, checkpoint conversion, GPT-2's init."""

    config_class = GPT2Config
    base_key_map = KeyMap(GPT2_FROM_HF)
    hf_base_prefix = "transformer."

    @classmethod
    def preprocess_hf(cls, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF layout -> ours: transpose the Conv1D weights, split the fused ``c_attn`` into q, k and v.

        ``h.0.attn.c_attn.weight`` (C, 3C) becomes ``h.0.attn.c_attn.weight[q]``, ``[k]`` and ``[v]``, each (C, C)
        in nn.Linear's layout; the key map renames those thirds. Error messages name them so, with shapes in
        nn.Linear's (out, in) layout.
        """
        out = {}
        for key, tensor in hf_state.items():
            if key.endswith(_CONV1D_WEIGHTS):
                tensor = tensor.t()  # (in, out) -> (out, in)
            if key.endswith(_FUSED_QKV):
                for part, third in zip("qkv", tensor.chunk(3, dim=0), strict=True):  # (3C, ...) -> 3 x (C, ...)
                    out[f"{key}[{part}]"] = third
            else:
                out[key] = tensor
        return out

    @classmethod
    def postprocess_hf(cls, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Ours -> HF layout, the inverse of :meth:`preprocess_hf`: fuse q, k, v into ``c_attn``, transpose Conv1D."""
        out = {}
        for key, tensor in hf_state.items():
            if key.endswith(("[k]", "[v]")):
                continue  # fused with its [q] below
            if key.endswith("[q]"):
                key = key[: -len("[q]")]
                tensor = torch.cat([hf_state[f"{key}[{part}]"] for part in "qkv"])  # (3C, ...)
            out[key] = tensor.t() if key.endswith(_CONV1D_WEIGHTS) else tensor
        return out

    def init_weights(self) -> None:
        """HF's init, then GPT-2 §2.3: residual projections scaled by 1 / sqrt(number of residual layers)."""
        super().init_weights()
        std = self.config.initializer_range / math.sqrt(2 * self.config.num_layers)  # 2 residual sums per block
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith(("attn.out_proj.weight", "mlp.fc_out.weight")):
                    nn.init.normal_(param, std=std)


class GPT2Model(GPT2PreTrainedModel):
    """The decoder: embeddings, pre-LN blocks with causal self-attention, final LayerNorm."""

    task = "base"
    hf_architecture = "GPT2Model"
    our_base_prefix = ""

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.embed = GPT2Embeddings(config)
        self.layers = nn.ModuleList([Block(config.layer_config(i), i) for i in range(config.num_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        if config.reorder_and_upcast_attn and config.attn_implementation == "eager":  # HF's SDPA path ignores it
            for block in self.layers:
                block.attn.attend = upcast_reordered_attention

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed.tokens

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """Decode a batch of T new positions after the cached ones.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, S) 1 for real tokens, 0 for padding (left padding), over cached + new positions.
            position_ids: (B, T); default counts real tokens only, continuing after the cache.
            past_key_values: a :class:`KVCache` from an earlier call, extended in place.
            use_cache: start a new cache when ``past_key_values`` is None.
            token_type_ids: (B, T) segment ids, embedded with the token table.
            inputs_embeds: (B, T, C) instead of ``input_ids``.
            output_hidden_states: also return the embeddings and every layer's output (the last one normalised).

        Returns:
            ``last_hidden_state`` (B, T, C), ``past_key_values`` (the cache, when one is used), ``hidden_states``.

        Raises:
            ValueError: more positions than ``max_seq_len``.
        """
        B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past_len = len(cache) if cache is not None else 0
        if past_len + T > self.config.max_seq_len:
            raise ValueError(
                f"{past_len + T} positions ({past_len} cached + {T} new) exceed max_seq_len (n_positions) "
                f"{self.config.max_seq_len}: GPT-2's learned positions stop there; truncate or use a sliding window"
            )
        device = self.embed.positions.weight.device
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, T, past_len, device)  # (B or 1, T)
        x = self.embed(input_ids, position_ids, token_type_ids, inputs_embeds)
        mask = causal_mask(attention_mask, T, past_len + T, device)  # None: plain causal, SDPA's fast path
        hidden = [x] if output_hidden_states else None
        for block in self.layers:
            x = block(x, mask, is_causal=mask is None, cache=cache)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x  # as in HF: the last entry is the normalised output
        return ModelOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden) if hidden is not None else None,
            past_key_values=cache,
        )


class _GPT2HeadModel(GPT2PreTrainedModel):
    """A head on top of ``self.backbone``; subclasses set the key map and build ``self.head``."""

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.backbone = GPT2Model(config)
        self.head = nn.Module()

    def _decode(
        self,
        input_ids,
        attention_mask,
        position_ids,
        past_key_values,
        use_cache,
        token_type_ids,
        inputs_embeds,
        output_hidden_states,
    ) -> ModelOutput:
        return self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            token_type_ids=token_type_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
        )


class _GPT2WithLMHead(_GPT2HeadModel):
    """A head model with the LM head: logits = h @ tokens^T, the token embeddings reused (``tie_word_embeddings``)."""

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.head.lm_head = lm_head(config)
        self.tie_weights()

    def get_output_embeddings(self) -> Linear:
        return self.head.lm_head


class GPT2LMHeadModel(GenerationMixin, _GPT2WithLMHead):
    """Causal language modelling: predict every next token; the head GPT-2 was pretrained with."""

    task = "causal-lm"
    hf_architecture = "GPT2LMHeadModel"
    head_key_map = KeyMap(LM_FROM_HF)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """Inputs as in :meth:`GPT2Model.forward`.

        Args:
            labels: (B, T) target ids, usually ``input_ids`` itself (shifted inside); -100 where not scored.
            logits_to_keep: > 0 computes logits for the last that many positions only (generation needs one:
                the vocabulary projection of a whole prompt is wasted); 0 for all. Not with ``labels``.

        Returns:
            ``logits`` (B, T, V) (T = ``logits_to_keep`` when set), ``loss`` when labels are given,
            ``past_key_values``, ``hidden_states``.

        Raises:
            ValueError: ``logits_to_keep`` together with ``labels``.
        """
        check_logits_to_keep(logits_to_keep, labels)
        out = self._decode(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            use_cache,
            token_type_ids,
            inputs_embeds,
            output_hidden_states,
        )
        return causal_lm_output(self.head.lm_head, out, labels, logits_to_keep)


class GPT2ForSequenceClassification(_GPT2HeadModel):
    """A linear classifier (no bias) on the last real token, the only one that has seen the whole text."""

    task = "sequence-classification"
    hf_architecture = "GPT2ForSequenceClassification"
    head_key_map = KeyMap(SCORE_FROM_HF)

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.head.score = Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """Inputs as in :meth:`GPT2Model.forward`.

        Args:
            labels: (B,) class ids, (B,) floats (regression) or (B, L) multi-hot (``problem_type``).

        Returns:
            ``logits`` (B, L) read at each row's last real token; ``loss`` when labels are given.
        """
        out = self._decode(
            input_ids, attention_mask, position_ids, None, False, token_type_ids, inputs_embeds, output_hidden_states
        )
        h = out.last_hidden_state
        B, T = h.shape[:2]
        logits = self.head.score(h[torch.arange(B, device=h.device), self.last_token_index(input_ids, B, T)])  # (B, L)
        loss = sequence_classification_loss(self.config, logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class GPT2ForTokenClassification(_GPT2HeadModel):
    """A linear classifier on every token (tagging); each token sees only its left context."""

    task = "token-classification"
    hf_architecture = "GPT2ForTokenClassification"
    head_key_map = KeyMap(CLASSIFIER_FROM_HF)

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        p = config.classifier_dropout
        self.head.dropout = nn.Dropout(0.1 if p is None else p)
        self.head.classifier = Linear(config.hidden_size, config.num_labels)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """Returns logits (B, T, L). ``labels``: (B, T) tag ids, -100 on positions not scored."""
        out = self._decode(
            input_ids, attention_mask, position_ids, None, False, token_type_ids, inputs_embeds, output_hidden_states
        )
        logits = self.head.classifier(self.head.dropout(out.last_hidden_state))
        loss = token_loss(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class GPT2ForQuestionAnswering(_GPT2HeadModel):
    """Extractive QA: a start score and an end score for every token."""

    task = "question-answering"
    hf_architecture = "GPT2ForQuestionAnswering"
    head_key_map = KeyMap(QA_FROM_HF)

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.head.qa_outputs = Linear(config.hidden_size, 2)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """Returns ``start_logits`` and ``end_logits`` (B, T); loss when both positions (B,) are given."""
        out = self._decode(
            input_ids, attention_mask, position_ids, None, False, token_type_ids, inputs_embeds, output_hidden_states
        )
        start_logits, end_logits = self.head.qa_outputs(out.last_hidden_state).unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = span_loss(start_logits, end_logits, start_positions, end_positions)
        return ModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits, hidden_states=out.hidden_states)


class GPT2DoubleHeadsModel(_GPT2WithLMHead):
    """GPT's fine-tuning recipe (Radford et al. 2018 §3.3): LM logits plus one score per choice.

    Each of the N choices is a sequence ``start context delimiter choice extract``; the choice score is read
    at the ``extract`` token (``mc_token_ids``) through :class:`SequenceSummary`, and the LM loss on the same
    text is kept as an auxiliary objective (add ``loss`` and ``mc_loss``, weighted as you like).
    """

    task = "pair-classification"
    hf_architecture = "GPT2DoubleHeadsModel"
    head_key_map = KeyMap({**LM_FROM_HF, **SUMMARY_FROM_HF})

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.head.summary = SequenceSummary(config)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        labels: torch.Tensor | None = None,
        mc_token_ids: torch.Tensor | None = None,
        mc_labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """Score N choices per example.

        Args:
            input_ids: (B, N, T) one sequence per choice; ``attention_mask``, ``position_ids``, ``token_type_ids``
                and ``labels`` have the same shape, ``inputs_embeds`` is (B, N, T, C).
            labels: (B, N, T) LM targets, shifted inside; -100 where not scored.
            mc_token_ids: (B, N) position of each choice's ``extract`` token; default the last position.
            mc_labels: (B,) index of the right choice.
            past_key_values, use_cache: a KV cache over the B * N flattened sequences.

        Returns:
            ``logits`` (B, N, T, V), ``mc_logits`` (B, N), ``loss`` (LM) and ``mc_loss`` when their labels are
            given, ``past_key_values``, ``hidden_states`` (of the flattened (B * N, T, C) sequences).
        """
        ref = input_ids if input_ids is not None else inputs_embeds
        B, N, T = ref.shape[:3]

        ids, mask, positions, types, embeds = flatten_choices(
            B, N, input_ids, attention_mask, position_ids, token_type_ids, inputs_embeds
        )
        out = self._decode(ids, mask, positions, past_key_values, use_cache, types, embeds, output_hidden_states)
        h = out.last_hidden_state.view(B, N, T, -1)  # (B, N, T, C)
        logits = self.head.lm_head(h)  # (B, N, T, V)
        mc_logits = self.head.summary(h, mc_token_ids).squeeze(-1)  # (B, N)
        loss = shifted_lm_loss(logits, labels) if labels is not None else None
        mc_loss = None
        if mc_labels is not None:
            mc_loss = F.cross_entropy(mc_logits.view(-1, mc_logits.size(-1)), mc_labels.view(-1))
        return ModelOutput(
            loss=loss,
            mc_loss=mc_loss,
            logits=logits,
            mc_logits=mc_logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
        )


TASKS: dict[str, type[GPT2PreTrainedModel]] = {
    cls.task: cls
    for cls in (
        GPT2Model,
        GPT2LMHeadModel,
        GPT2ForSequenceClassification,
        GPT2ForTokenClassification,
        GPT2ForQuestionAnswering,
        GPT2DoubleHeadsModel,
    )
}
