"""BigBird (Zaheer et al. 2020): BERT with BigBird's embeddings and names, full or block-sparse attention.

What differs from BERT, and nothing else:
- the embeddings may be scaled by sqrt(hidden_size) (``rescale_embeddings``), and dropout comes before their
  LayerNorm;
- the q, k, v projections may lack biases (``use_bias``); the pooler is a bare linear layer in the checkpoint;
- the sequence classifier is a small MLP on [CLS] with ``hidden_act`` between its layers (no pooler).

Attention: ``original_full`` is dense attention, computed as BERT's. ``block_sparse`` attends fully up to
(5 + 2 num_random_blocks) block_size tokens, as ``transformers`` does (which then switches the model to
``original_full`` for good: a later long input stays dense there). Beyond that, every layer runs
:func:`~bunmyaku.models.sparse_attention.block_sparse_attention`, linear in length: the sequence is cut into blocks
(the last one padded, as ``transformers`` pads to a block multiple) and
- the first and the last block are global: their queries see every key, and every query sees their keys;
- every other query block sees its own block and the blocks on each side (the window);
- every other query block also sees ``num_random_blocks`` random key blocks.

Random blocks in training: every layer of every forward draws its own, each head apart, with torch's generator on
the model's device (``torch.manual_seed`` repeats a run), under ``transformers``' rule of which key blocks a query
block may draw (:func:`~bunmyaku.models.sparse_attention.random_block_choices`: r distinct blocks, never its window
nor block 0; only among the first 2r + 5 blocks, as its "plan" has it, or the first 1024 tokens at 1024, 3072 and
4096 tokens, as its older rule has it). In eval mode ``transformers``
draws none: its adjacency list of random blocks stays all zeros (``_bigbird_block_rand_mask`` returns before
sampling when ``not self.training``), so each "random" block is block 0, whose keys are then in the softmax
``1 + num_random_blocks`` times; the block-sparse path gathers block 0 that many times too
(:meth:`~bunmyaku.models.sparse_attention.BlockSparsePattern.eval_mode`), which gives ``transformers``' eval outputs
on real tokens (padding positions are zeroed there and not compared).

Known differences: in training ``transformers`` reseeds numpy's global generator with the layer index on every
forward, so each layer draws the same blocks at every step (and numpy's global state is reset as a side effect);
here each forward draws anew (a choice: over training a query block then meets every block the rule allows,
not r fixed ones per layer), so training outputs differ from ``transformers``' even without dropout.
``output_attentions`` and the eager path are refused beyond the full-attention limit (no (T, T) weights exist there).

Heads: masked LM, sequence classification, token classification.
"""

from __future__ import annotations

import functools
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
from bunmyaku.models.sparse_attention import BlockSparsePattern, block_sparse_attention


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

    def __init__(self, config: BigBirdConfig, add_pooler: bool = True):
        super().__init__(config, add_pooler)
        for block in self.layers:  # BERT's attention, block-sparse when its mask is a block-sparse pattern
            block.attn.attend = functools.partial(_attend, dense=block.attn.attend)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        **kwargs,
    ) -> ModelOutput:
        """:meth:`BertModel.forward`; a ``block_sparse`` config past its full-attention limit attends block-sparsely.

        Raises:
            ValueError: block-sparse attention asked for with ``output_attentions`` or the eager path.
        """
        limit = self.config.full_attention_limit
        ref = input_ids if input_ids is not None else inputs_embeds
        if limit is None or ref is None or ref.size(1) <= limit:
            return super().forward(
                input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_hidden_states, **kwargs
            )
        if self.layers[0].attn.recorded is not None or self.config.attn_implementation != "sdpa":
            raise ValueError(
                f"{ref.size(1)} tokens with attention_type='block_sparse' (past the full-attention limit {limit}): "
                "block-sparse attention runs on SDPA only, without output_attentions"
            )
        x = self.embed(input_ids, token_type_ids, position_ids, inputs_embeds)  # (B, T, C)
        config = self.config
        fixed = BlockSparsePattern.eval_mode(
            config.block_size, config.num_random_blocks, x.size(1), attention_mask, device=x.device
        )
        hidden = [x] if output_hidden_states else None
        for block in self.layers:
            # training: each layer its own draw, made here so that a checkpointed block recomputes with the same one
            mask = fixed.redrawn(config.num_heads, config.max_seq_len) if self.training else fixed
            x = block(x, mask)
            if hidden is not None:
                hidden.append(x)
        if kwargs.get("first_token_only"):
            x = x[:, :1]  # (B, 1, C): what the caller reads; every position was computed all the same
        return ModelOutput(
            last_hidden_state=x,
            pooler_output=self.pooler(x) if self.pooler is not None else None,
            hidden_states=tuple(hidden) if hidden is not None else None,
        )


def _attend(q, k, v, mask=None, *, dense, dropout_p: float = 0.0, scale: float | None = None, **kwargs):
    """:func:`block_sparse_attention` when ``mask`` is a :class:`BlockSparsePattern`, else ``dense`` (SDPA)."""
    if isinstance(mask, BlockSparsePattern):
        return block_sparse_attention(q, k, v, mask, dropout_p=dropout_p, scale=scale)
    return dense(q, k, v, mask=mask, dropout_p=dropout_p, scale=scale, **kwargs)


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

    def parameters_maybe_unused(self) -> list[str]:
        """The pooler, kept for the checkpoint's names: no head reads it. Distributed training reads this (DDP must
        then look for unused parameters)."""
        return [name for name, _ in self.named_parameters() if name.startswith("backbone.pooler.")]


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
