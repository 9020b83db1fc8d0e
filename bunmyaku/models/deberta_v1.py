"""DeBERTa v1 (He et al. 2021, ``microsoft/deberta-base``): DeBERTa-v2's architecture, earlier. Built from its parts.

What differs from v2 (:mod:`bunmyaku.models.deberta`), and nothing else:

- q, k and v come from one projection without bias (``qkv_proj``, per head: D rows of q, D of k, D of v, as the
  checkpoints store it), plus a query bias and a value bias; the key has none;
- the c2p term's position projection has no bias; positions are never bucketed, never shared with the content
  projections, and the relative embeddings are never normed; there is no convolution layer;
- the relative embeddings used are the 2 * min(T, max_relative_positions) around distance 0 (the same scores as the
  whole table: a distance needs clamping only past max_relative_positions);
- ``talking_head`` (mixing the heads' scores) is not supported: no released checkpoint uses it.

Heads: masked LM (legacy or ``lm_predictions`` layout), sequence classification, token classification and
extractive QA, as in v2 (``transformers`` has no v1 multiple-choice head, so neither has bunmyaku).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bunmyaku.hub import KeyMap
from bunmyaku.hub.keymap import linear_map
from bunmyaku.models import deberta
from bunmyaku.models.linear import Linear

V2_ONLY = ("position_buckets", "share_att_key", "norm_rel_ebd", "conv_kernel_size", "conv_act", "conv_groups")


@dataclass
class DebertaConfig(deberta.DebertaV2Config):
    """DeBERTa v1 hyper-parameters; defaults are ``transformers``' (deberta-base sizes, relative attention off).

    deberta-base sets ``relative_attention=True, pos_att_type="c2p|p2c", position_biased_input=False``.
    """

    model_type: ClassVar[str] = "deberta"

    vocab_size: int = 50265
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    talking_head: bool = False

    def __post_init__(self) -> None:
        # v1 has none of v2's additions; transformers ignores them in a v1 config.json, and so do we
        self.position_buckets, self.share_att_key, self.norm_rel_ebd, self.conv_kernel_size = -1, False, "none", 0
        super().__post_init__()
        if self.talking_head:
            raise ValueError("talking_head=True is not supported (no released DeBERTa checkpoint uses it)")

    def to_hf(self) -> dict:
        out = super().to_hf()
        for key in V2_ONLY:
            out.pop(key, None)
        if not self.talking_head:
            out.pop("talking_head", None)
        return out


class DebertaAttention(deberta.DisentangledAttention):
    """v2's disentangled attention with v1's projections: fused q, k, v without bias, then q and v biases."""

    def __init__(self, config: DebertaConfig, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        del self.q_proj, self.k_proj, self.v_proj  # one fused projection instead
        C, HD = config.hidden_size, config.num_heads * config.head_dim
        self.qkv_proj = Linear(C, 3 * HD, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(HD))
        self.v_bias = nn.Parameter(torch.zeros(HD))
        if self.relative and "c2p" in self.terms:
            self.pos_k_proj = Linear(C, HD, bias=False)
        self.max_relative = config.max_relative

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> q, k, v (B, H, T, D): each head's 3 * D outputs of ``qkv_proj`` hold its q, k and v."""
        q, k, v = self._heads3(self.qkv_proj(x)).chunk(3, dim=-1)  # (B, H, T, D) each
        return q + self._heads(self.q_bias[None]), k, v + self._heads(self.v_bias[None])

    def _project_query(self, x: torch.Tensor) -> torch.Tensor:
        return self._project(x)[0]  # the fused projection: k and v of these few positions come along

    def _project_context(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._project(x)[1:]

    def _heads3(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H * 3D) -> (B, H, T, 3D)."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def _project_positions(self, rel: torch.Tensor, length: int):
        """Only the 2 * span embeddings around distance 0 that a length-T sequence can reach are projected."""
        span = min(length, self.max_relative)
        rel = rel[self.max_relative - span : self.max_relative + span]  # (2 * span, C)
        pos_q = self._heads(self.pos_q_proj(rel)) if "p2c" in self.terms else None  # (H, 2 * span, D)
        pos_k = self._heads(self.pos_k_proj(rel)) if "c2p" in self.terms else None
        return pos_q, pos_k, span


class DebertaBlock(deberta.DebertaBlock):
    attention_class = DebertaAttention


DEBERTA_FROM_HF = {k: v for k, v in deberta.DEBERTA_FROM_HF.items() if ".attention.self." not in k}
DEBERTA_FROM_HF.update(
    {
        "encoder.layer.{}.attention.self.in_proj.weight": "layers.{}.attn.qkv_proj.weight",
        "encoder.layer.{}.attention.self.q_bias": "layers.{}.attn.q_bias",
        "encoder.layer.{}.attention.self.v_bias": "layers.{}.attn.v_bias",
        "encoder.layer.{}.attention.self.pos_proj.weight": "layers.{}.attn.pos_k_proj.weight",
        **linear_map("encoder.layer.{}.attention.self.pos_q_proj", "layers.{}.attn.pos_q_proj"),
    }
)


class DebertaPreTrainedModel(deberta.DebertaV2PreTrainedModel):
    config_class = DebertaConfig
    base_key_map = KeyMap(DEBERTA_FROM_HF)


class DebertaModel(DebertaPreTrainedModel, deberta.DebertaV2Model):
    """v2's encoder with v1's attention."""

    hf_architecture = "DebertaModel"
    block_class = DebertaBlock


class _DebertaHead:
    """Mixin: a v2 head on v1's base model, under v1's names."""

    config_class = DebertaConfig
    base_key_map = KeyMap(DEBERTA_FROM_HF)
    base_class = DebertaModel


class DebertaForMaskedLM(_DebertaHead, deberta.DebertaV2ForMaskedLM):
    hf_architecture = "DebertaForMaskedLM"


class DebertaForSequenceClassification(_DebertaHead, deberta.DebertaV2ForSequenceClassification):
    hf_architecture = "DebertaForSequenceClassification"


class DebertaForTokenClassification(_DebertaHead, deberta.DebertaV2ForTokenClassification):
    hf_architecture = "DebertaForTokenClassification"


class DebertaForQuestionAnswering(_DebertaHead, deberta.DebertaV2ForQuestionAnswering):
    hf_architecture = "DebertaForQuestionAnswering"


TASKS = {
    cls.task: cls
    for cls in (
        DebertaModel,
        DebertaForMaskedLM,
        DebertaForSequenceClassification,
        DebertaForTokenClassification,
        DebertaForQuestionAnswering,
    )
}
