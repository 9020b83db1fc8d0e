"""RoBERTa (Liu et al. 2019): BERT's architecture, trained better. Built from BERT's parts.

What differs from BERT, and nothing else:
- positions start after the padding index (pad = 1, first real token at position 2) and padding
  tokens keep the padding position, so ids are computed from ``input_ids``;
- one segment type by default (no next-sentence prediction, so no segment B);
- the MLM head always uses exact GELU; the sequence classifier is a small MLP on ``<s>`` (no pooler).

Heads: masked LM, sequence classification, token classification, extractive QA, multiple choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bunmyaku.hub import KeyMap
from bunmyaku.hub.keymap import linear_map
from bunmyaku.models import bert
from bunmyaku.models.base import ModelOutput
from bunmyaku.models.linear import Linear


@dataclass
class RobertaConfig(bert.BertConfig):
    """RoBERTa hyper-parameters; defaults are roberta-base."""

    model_type: ClassVar[str] = "roberta"

    vocab_size: int = 50265
    max_seq_len: int = 514
    type_vocab_size: int = 1
    norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2


class RobertaEmbeddings(bert.BertEmbeddings):
    """BERT's embeddings with positions counted from ``pad_token_id + 1``, skipping padding."""

    def __init__(self, config: RobertaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.positions.padding_idx = config.pad_token_id

    def default_positions(self, input_ids: torch.Tensor | None, shape: torch.Size, device) -> torch.Tensor:
        """(B, T): pad + 1, pad + 2, ... over real tokens; ``pad`` on padding tokens."""
        if input_ids is None:  # embeddings given: no way to see padding, count every position
            return torch.arange(self.padding_idx + 1, self.padding_idx + 1 + shape[1], device=device)[None]
        real = input_ids.ne(self.padding_idx).long()
        return real.cumsum(dim=1) * real + self.padding_idx


class RobertaModel(bert.BertModel):
    """BERT's encoder with RoBERTa's embeddings."""

    config_class = RobertaConfig
    hf_architecture = "RobertaModel"
    hf_base_prefix = "roberta."
    embeddings_class = RobertaEmbeddings


class RobertaMLMHead(bert.BertMLMHead):
    """BERT's MLM head with exact GELU, whatever ``hidden_act`` says (as in fairseq)."""

    def __init__(self, config: RobertaConfig, embedding: nn.Embedding):
        super().__init__(config, embedding)
        self.act = F.gelu


class RobertaClassificationHead(nn.Module):
    """dropout -> dense -> tanh -> dropout -> out_proj, on the ``<s>`` state: (B, T, C) -> (B, L)."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        p = config.dropout if config.classifier_dropout is None else config.classifier_dropout
        self.dropout = nn.Dropout(p)
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.out_proj = Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.dropout(torch.tanh(self.dense(self.dropout(hidden[:, 0]))))
        return self.out_proj(x)


class _RobertaHeadModel:
    """Mixin: a BERT head on RoBERTa's base model, under RoBERTa's HF names."""

    config_class = RobertaConfig
    hf_base_prefix = "roberta."
    base_class = RobertaModel


LM_FROM_HF = {
    **linear_map("lm_head.dense", "head.mlm.dense"),
    **linear_map("lm_head.layer_norm", "head.mlm.norm"),
    "lm_head.bias": "head.mlm.bias",
    "lm_head.decoder.weight": None,  # tied to the token embeddings
    "lm_head.decoder.bias": None,  # tied to lm_head.bias
}
CLASSIFIER_FROM_HF = {
    **linear_map("classifier.dense", "head.classifier.dense"),
    **linear_map("classifier.out_proj", "head.classifier.out_proj"),
}


class RobertaForMaskedLM(_RobertaHeadModel, bert.BertForMaskedLM):
    """Masked language modelling with RoBERTa's LM head."""

    hf_architecture = "RobertaForMaskedLM"
    head_key_map = KeyMap(LM_FROM_HF)
    mlm_head_class = RobertaMLMHead


class RobertaForSequenceClassification(_RobertaHeadModel, bert.BertForSequenceClassification):
    """Sequence classification / regression from the ``<s>`` state through a small MLP (no pooler)."""

    hf_architecture = "RobertaForSequenceClassification"
    head_key_map = KeyMap(CLASSIFIER_FROM_HF)
    add_pooler = False

    def __init__(self, config: RobertaConfig):
        bert._BertHeadModel.__init__(self, config)  # BERT's classifier is replaced, not built and discarded
        self.head.classifier = RobertaClassificationHead(config)

    def _classify(self, out: ModelOutput) -> torch.Tensor:
        """The small MLP on the ``<s>`` state (no pooler): (B, T, C) -> (B, L) logits."""
        return self.head.classifier(out.last_hidden_state)


class RobertaForTokenClassification(_RobertaHeadModel, bert.BertForTokenClassification):
    """A linear classifier on every token (NER, tagging)."""

    hf_architecture = "RobertaForTokenClassification"


class RobertaForQuestionAnswering(_RobertaHeadModel, bert.BertForQuestionAnswering):
    """Extractive QA: a start score and an end score for every token."""

    hf_architecture = "RobertaForQuestionAnswering"


class RobertaForMultipleChoice(_RobertaHeadModel, bert.BertForMultipleChoice):
    """Multiple choice; its dropout is the hidden dropout, never ``classifier_dropout`` (as in HF)."""

    hf_architecture = "RobertaForMultipleChoice"

    def _classifier_dropout(self) -> nn.Dropout:
        return nn.Dropout(self.config.dropout)


TASKS = {
    cls.task: cls
    for cls in (
        RobertaModel,
        RobertaForMaskedLM,
        RobertaForSequenceClassification,
        RobertaForTokenClassification,
        RobertaForQuestionAnswering,
        RobertaForMultipleChoice,
    )
}
