"""BigBird (Zaheer et al. 2020) in its ``original_full`` mode: BERT with BigBird's embeddings and names.

What differs from BERT, and nothing else:
- the embeddings may be scaled by sqrt(hidden_size) (``rescale_embeddings``), and dropout comes before their
  LayerNorm;
- the q, k, v projections may lack biases (``use_bias``); the pooler is a bare linear layer in the checkpoint;
- the sequence classifier is a small MLP on [CLS] with ``hidden_act`` between its layers (no pooler).

Attention: ``original_full`` is dense attention, computed as BERT's. ``block_sparse`` (window + global + random
blocks) is not implemented here yet; a ``block_sparse`` checkpoint still runs on inputs of up to
(5 + 2 num_random_blocks) block_size tokens, because ``transformers`` itself switches to full attention there,
and longer inputs are refused with a message instead of silently computing something else.

Heads: masked LM, sequence classification, token classification.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bunmyaku.hub import KeyMap
from bunmyaku.models import bert, roberta
from bunmyaku.models.base import ModelOutput
from bunmyaku.models.config import LayerConfig
from bunmyaku.models.layers import activation


@dataclass
class BigBirdConfig(bert.BertConfig):
    """BigBird hyper-parameters; defaults are HF's ``BigBirdConfig`` (google/bigbird-roberta-base)."""

    model_type: ClassVar[str] = "big_bird"

    vocab_size: int = 50358
    hidden_act: str = "gelu_new"
    max_seq_len: int = 4096
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    sep_token_id: int | None = 66
    attention_type: str = "block_sparse"  # original_full | block_sparse
    use_bias: bool = True  # on the q, k, v projections
    rescale_embeddings: bool = False
    block_size: int = 64
    num_random_blocks: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attention_type not in ("original_full", "block_sparse"):
            raise ValueError(f"attention_type {self.attention_type!r}: expected 'original_full' or 'block_sparse'")

    @property
    def full_attention_limit(self) -> int | None:
        """The longest input computed with full attention (None: any); ``transformers`` switches there too."""
        if self.attention_type == "original_full":
            return None
        return (5 + 2 * self.num_random_blocks) * self.block_size

    def layer_config(self, layer_idx: int) -> LayerConfig:
        """BERT's block; ``use_bias`` applies to the q, k, v projections only (the output projection keeps its bias)."""
        config = super().layer_config(layer_idx)
        config.attention_bias, config.attention_out_bias = self.use_bias, True
        return config


class BigBirdEmbeddings(bert.BertEmbeddings):
    """BERT's embeddings, optionally scaled by sqrt(C), with dropout before the LayerNorm (as BigBird has it)."""

    def __init__(self, config: BigBirdConfig):
        super().__init__(config)
        self.scale = math.sqrt(config.hidden_size) if config.rescale_embeddings else None

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None) -> torch.Tensor:
        """(B, T) ids (or (B, T, C) embeddings) -> (B, T, C); (N,) -> (N, C) for packed rows."""
        x = self.tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.scale is not None:
            x = x * self.scale
        if position_ids is None:
            position_ids = self.default_positions(input_ids, x.shape[:2], x.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
        x = x + self.segments(token_type_ids) + self.positions(position_ids)
        return self.norm(self.dropout(x))


BIG_BIRD_FROM_HF = {k: v for k, v in bert.BERT_FROM_HF.items() if not k.startswith("pooler.")}
BIG_BIRD_FROM_HF.update({"pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias"})


class BigBirdModel(bert.BertModel):
    """BERT's encoder with BigBird's embeddings and checkpoint names, full attention."""

    config_class = BigBirdConfig
    hf_architecture = "BigBirdModel"
    hf_base_prefix = "bert."
    base_key_map = KeyMap(BIG_BIRD_FROM_HF)
    embeddings_class = BigBirdEmbeddings

    def forward(self, input_ids=None, attention_mask=None, *args, **kwargs) -> ModelOutput:
        """:meth:`BertModel.forward`; refuses inputs that ``block_sparse`` would attend to sparsely.

        Raises:
            ValueError: a ``block_sparse`` config and an input longer than its full-attention limit.
        """
        limit = self.config.full_attention_limit
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if limit is not None and ref is not None and ref.size(1) > limit:
            raise ValueError(
                f"{ref.size(1)} tokens with attention_type='block_sparse': bunmyaku computes BigBird's full attention "
                f"only, which transformers also uses up to {limit} tokens ((5 + 2 num_random_blocks) block_size); "
                "load with attention_type='original_full' for full attention at any length, or truncate"
            )
        return super().forward(input_ids, attention_mask, *args, **kwargs)


class BigBirdClassificationHead(roberta.RobertaClassificationHead):
    """RoBERTa's classifier MLP with ``hidden_act`` (not tanh) between its layers: (B, T, C) -> (B, L)."""

    def __init__(self, config: BigBirdConfig):
        super().__init__(config)
        self.act = activation(config.hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.act(self.dense(self.dropout(hidden[:, 0]))))
        return self.out_proj(x)


class _BigBirdHeadModel:
    """Mixin: a BERT head on BigBird's base model, under BigBird's HF names; every HF head keeps the pooler."""

    config_class = BigBirdConfig
    hf_base_prefix = "bert."
    base_key_map = KeyMap(BIG_BIRD_FROM_HF)
    base_class = BigBirdModel
    add_pooler = True


class BigBirdForMaskedLM(_BigBirdHeadModel, bert.BertForMaskedLM):
    """Masked language modelling with BERT's MLM head."""

    hf_architecture = "BigBirdForMaskedLM"


class BigBirdForSequenceClassification(_BigBirdHeadModel, bert.BertForSequenceClassification):
    """Sequence classification / regression from the [CLS] state through BigBird's classifier MLP."""

    hf_architecture = "BigBirdForSequenceClassification"
    head_key_map = KeyMap(roberta.CLASSIFIER_FROM_HF)

    def __init__(self, config: BigBirdConfig):
        bert._BertHeadModel.__init__(self, config)  # BERT's classifier is replaced, not built and discarded
        self.head.classifier = BigBirdClassificationHead(config)

    def _classify(self, out: ModelOutput) -> torch.Tensor:
        return self.head.classifier(out.last_hidden_state)


class BigBirdForTokenClassification(_BigBirdHeadModel, bert.BertForTokenClassification):
    """A linear classifier on every token (NER, tagging)."""

    hf_architecture = "BigBirdForTokenClassification"


TASKS: dict[str, type[nn.Module]] = {
    cls.task: cls
    for cls in (BigBirdModel, BigBirdForMaskedLM, BigBirdForSequenceClassification, BigBirdForTokenClassification)
}
