"""BERT (Devlin et al. 2019): a post-LN Transformer encoder with token, position and segment embeddings.

Notation: B batch, T sequence length, C hidden size, V vocabulary, N choices, L labels.

    input_ids, token_type_ids, positions
        -> tokens + segments + positions -> LayerNorm -> dropout       (BertEmbeddings)
        -> num_layers x post-LN Block (self-attention, GELU MLP)       (layers.Block)
        -> last_hidden_state (B, T, C); pooler: tanh(W h[CLS]) (B, C)

A right-padded batch runs unpadded (``config.unpad``, the default): the N real tokens are packed into (N, C)
before the embeddings' LayerNorm and scattered back to (B, T, C) after the last block, so nothing but
attention ever sees padding. Outputs at padding positions are then zeros (they are meaningless anyway); a head
whose loss reads padding positions (labels there, or QA's softmax over every position) runs the batch padded
(``_BertHeadModel._encode``), so every loss is the one HF computes.

Heads: masked LM, next-sentence prediction, both (pretraining), sequence classification (single-label,
multi-label, regression), token classification, extractive QA, multiple choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bunmyaku.hub import KeyMap
from bunmyaku.hub.keymap import linear_map
from bunmyaku.models.attention import padding_mask
from bunmyaku.models.base import ModelOutput, PreTrainedModel
from bunmyaku.models.config import LayerConfig, ModelConfig
from bunmyaku.models.fastpath import Packing
from bunmyaku.models.heads import flatten_choices, multi_sample, sequence_classification_loss, span_loss, token_loss
from bunmyaku.models.layers import Block, activation
from bunmyaku.models.linear import Linear, linear


@dataclass
class BertConfig(ModelConfig):
    """BERT hyper-parameters; defaults are bert-base-uncased."""

    model_type: ClassVar[str] = "bert"
    HF_NAMES: ClassVar[dict[str, str]] = {
        "num_layers": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "dropout": "hidden_dropout_prob",
        "attention_dropout": "attention_probs_dropout_prob",
        "max_seq_len": "max_position_embeddings",
        "norm_eps": "layer_norm_eps",
    }
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = (*ModelConfig.RUNTIME_FIELDS, "unpad")
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int | None = None  # None means 4 * hidden_size
    hidden_act: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    max_seq_len: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    classifier_dropout: float | None = None
    tie_word_embeddings: bool = True
    position_embedding_type: str = "absolute"
    unpad: bool = True  # run padded batches on their real tokens only; False: the plain (B, T, C) path

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"position_embedding_type {self.position_embedding_type!r}: only 'absolute' is supported")
        if not self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=False: BERT's masked-LM decoder is always the embedding matrix here")
        activation(self.hidden_act)

    def layer_config(self, layer_idx: int) -> LayerConfig:
        """What each block reads: post-LN (norm(x + f(x))), LayerNorm, a GELU MLP, biases everywhere."""
        return LayerConfig(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            pre_norm=False,
            norm_eps=self.norm_eps,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            attn_implementation=self.attn_implementation,
        )


class BertEmbeddings(nn.Module):
    """Token + segment + learned position embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.positions = nn.Embedding(config.max_seq_len, config.hidden_size)
        self.segments = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def default_positions(self, input_ids: torch.Tensor | None, shape: torch.Size, device) -> torch.Tensor:
        """(1, T) positions 0..T-1; RoBERTa overrides this."""
        return torch.arange(shape[1], device=device)[None]

    def forward(
        self,
        input_ids: torch.Tensor | None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) ids (or (B, T, C) embeddings) -> (B, T, C)."""
        x = self.tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            position_ids = self.default_positions(input_ids, x.shape[:2], x.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
        x = x + self.segments(token_type_ids) + self.positions(position_ids)
        return self.dropout(self.norm(x))


class BertPooler(nn.Module):
    """tanh(W h_[CLS] + b): the sentence representation the NSP and sequence heads read."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


BERT_FROM_HF = {
    "embeddings.word_embeddings.weight": "embed.tokens.weight",
    "embeddings.position_embeddings.weight": "embed.positions.weight",
    "embeddings.token_type_embeddings.weight": "embed.segments.weight",
    "embeddings.LayerNorm.weight": "embed.norm.weight",
    "embeddings.LayerNorm.bias": "embed.norm.bias",
    "embeddings.position_ids": None,  # buffers, rebuilt on the fly
    "embeddings.token_type_ids": None,
    "pooler.dense.weight": "pooler.dense.weight",
    "pooler.dense.bias": "pooler.dense.bias",
}
for _hf, _ours in [
    ("attention.self.query", "attn.q_proj"),
    ("attention.self.key", "attn.k_proj"),
    ("attention.self.value", "attn.v_proj"),
    ("attention.output.dense", "attn.out_proj"),
    ("attention.output.LayerNorm", "attn_norm"),
    ("intermediate.dense", "mlp.fc_in"),
    ("output.dense", "mlp.fc_out"),
    ("output.LayerNorm", "mlp_norm"),
]:
    for _p in ("weight", "bias"):
        BERT_FROM_HF[f"encoder.layer.{{}}.{_hf}.{_p}"] = f"layers.{{}}.{_ours}.{_p}"


MLM_FROM_HF = {
    **linear_map("cls.predictions.transform.dense", "head.mlm.dense"),
    **linear_map("cls.predictions.transform.LayerNorm", "head.mlm.norm"),
    "cls.predictions.bias": "head.mlm.bias",
    "cls.predictions.decoder.weight": None,  # tied to the token embeddings
    "cls.predictions.decoder.bias": None,  # tied to cls.predictions.bias
}
NSP_FROM_HF = linear_map("cls.seq_relationship", "head.nsp")
CLASSIFIER_FROM_HF = linear_map("classifier", "head.classifier")
QA_FROM_HF = linear_map("qa_outputs", "head.qa_outputs")


class BertPreTrainedModel(PreTrainedModel):
    """Shared by BERT's base model and heads: config class and the checkpoint key map."""

    config_class = BertConfig
    base_key_map = KeyMap(BERT_FROM_HF)
    hf_base_prefix = "bert."
    optional_base_modules = ("pooler.",)

    @classmethod
    def preprocess_hf(cls, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accept the original TF-converted names ``LayerNorm.gamma`` / ``LayerNorm.beta``."""
        renamed = {}
        for key, tensor in hf_state.items():
            if key.endswith(".gamma"):
                key = key[: -len("gamma")] + "weight"
            elif key.endswith(".beta"):
                key = key[: -len("beta")] + "bias"
            renamed[key] = tensor
        return renamed


class BertModel(BertPreTrainedModel):
    """The encoder: embeddings, blocks and (optionally) the pooler.

    Args:
        config: the hyper-parameters.
        add_pooler: build the [CLS] pooler (heads that read every position do without).
    """

    task = "base"
    hf_architecture = "BertModel"
    our_base_prefix = ""
    embeddings_class: ClassVar[type[nn.Module]] = BertEmbeddings

    def __init__(self, config: BertConfig, add_pooler: bool = True):
        super().__init__(config)
        self.embed = self.embeddings_class(config)
        self.layers = nn.ModuleList([Block(config.layer_config(i), i) for i in range(config.num_layers)])
        self.pooler = BertPooler(config) if add_pooler else None

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed.tokens

    def _pack_inputs(self, packing, input_ids, token_type_ids, position_ids, inputs_embeds):
        """The real tokens' ids, segments, positions (N,) and embeddings (N, C), defaults filled in on (B, T) first.

        Positions must come from the padded layout: RoBERTa counts them along each row, skipping padding.
        """
        ref = input_ids if input_ids is not None else inputs_embeds
        if position_ids is None:
            position_ids = self.embed.default_positions(input_ids, ref.shape[:2], ref.device)  # (B or 1, T)
        return packing.unpad_inputs(input_ids, token_type_ids, position_ids, inputs_embeds)

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
        """Encode a batch (unpadded inside when it has padding and ``config.unpad``).

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1 for real tokens, 0 for padding.
            token_type_ids: (B, T) segment ids (0 for the first text, 1 for the second).
            position_ids: (B, T); default 0..T-1.
            inputs_embeds: (B, T, C) instead of ``input_ids``.
            output_hidden_states: also return the embeddings and every layer's output.
            unpad: run on the real tokens only (outputs at padding are then zeros); default ``config.unpad``.
            first_token_only: only position 0 ([CLS]) is read, as by the pooler: the last layer computes its
                query, attention and MLP for position 0 alone (keys and values still for every position), and
                ``last_hidden_state`` is (B, 1, C). Not with ``output_hidden_states``.

        Returns:
            ``last_hidden_state`` (B, T, C), ``pooler_output`` (B, C) when the pooler exists, ``hidden_states``.
        """
        if first_token_only and output_hidden_states:
            raise ValueError("first_token_only=True cannot return hidden_states: the last layer skips positions")
        unpad = self.config.unpad if unpad is None else unpad
        if self.layers[0].attn.recorded is not None:  # output_attentions: every (B, H, T, T) map, padded layout
            unpad, first_token_only = False, False
        mask = padding_mask(attention_mask)  # None when nothing is padded
        # Right padding only: the pooler reads position 0, which must be computed, not a zero of the packing.
        if mask is not None and unpad and bool(attention_mask[:, 0].all()):
            packing = Packing.from_mask(attention_mask)
        else:
            packing = None
        if packing is not None:
            input_ids, token_type_ids, position_ids, inputs_embeds = self._pack_inputs(
                packing, input_ids, token_type_ids, position_ids, inputs_embeds
            )
            mask = None  # the packing carries its own
        x = self.embed(input_ids, token_type_ids, position_ids, inputs_embeds)  # (B, T, C), or (N, C) packed
        hidden = [x] if output_hidden_states else None
        last = len(self.layers) - 1
        for i, block in enumerate(self.layers):
            if first_token_only and i == last:
                first = x[:, :1] if packing is None else x[packing.cu_seqlens[:-1].long()]  # (B, 1, C) or (B, C)
                x = block(first, mask, packing=packing, context=x)
            else:
                x = block(x, mask, packing=packing)
            if hidden is not None:
                hidden.append(x)
        if packing is not None and first_token_only:
            x = x[:, None]  # (B, 1, C)
        elif packing is not None:
            x = packing.pad(x)  # (B, T, C)
            hidden = [packing.pad(h) for h in hidden] if hidden is not None else None
        return ModelOutput(
            last_hidden_state=x,
            pooler_output=self.pooler(x) if self.pooler is not None else None,
            hidden_states=tuple(hidden) if hidden is not None else None,
        )


class BertMLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> tokens' embedding matrix^T + bias: (B, T, C) -> (B, T, V)."""

    def __init__(self, config: BertConfig, embedding: nn.Embedding):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.embedding = [embedding]  # a list, so the tied matrix is not registered (and saved) twice

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(self.norm(self.act(self.dense(hidden))), self.embedding[0].weight, self.bias)


def _masked_positions(
    hidden: torch.Tensor, labels: torch.Tensor | None, masked_only: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T, C) hidden states and (B, T) labels, or with ``masked_only`` (M, C) and (M,) at labels != -100."""
    if not masked_only:
        return hidden, labels
    if labels is None:
        raise ValueError("masked_only=True needs labels, which mark the masked positions")
    scored = labels != -100
    return hidden[scored], labels[scored]


class _BertHeadModel(BertPreTrainedModel):
    """A head on top of ``self.backbone``; subclasses set the key map and build ``self.head``."""

    base_class: ClassVar[type[BertModel]] = BertModel
    add_pooler: ClassVar[bool] = False
    # the positions a head reads: "first" ([CLS], through the pooler), "labelled" (its loss reads the positions its
    # (B, T) labels score), "all" (its loss is a softmax over every position, padding included: QA's span loss)
    reads: ClassVar[str] = "labelled"

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.backbone = self.base_class(config, add_pooler=self.add_pooler)
        self.head = nn.Module()

    def _encode(
        self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_hidden_states, labels=None
    ) -> ModelOutput:
        """The backbone's output for what this head reads (``reads``); ``labels`` are the head's loss targets.

        An unpadded batch leaves the outputs at padding positions at zero, so the batch runs padded where the loss
        reads padding positions (per-token labels there, or QA's softmax over every position): the loss is then the
        one HF computes. A "first" head lets the last layer compute position 0 only (see :meth:`BertModel.forward`).
        """
        reads_padding = False
        if labels is not None and attention_mask is not None and self.reads != "first":
            reads_padding = self.reads == "all" or bool(((labels != -100) & (attention_mask == 0)).any())
        return self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            unpad=False if reads_padding else None,
            first_token_only=self.reads == "first" and not output_hidden_states,
        )

    def _classifier_dropout(self) -> nn.Dropout:
        p = self.config.classifier_dropout
        return nn.Dropout(self.config.dropout if p is None else p)


class BertForMaskedLM(_BertHeadModel):
    """Masked language modelling: predict the original token at every (masked) position."""

    task = "masked-lm"
    hf_architecture = "BertForMaskedLM"
    head_key_map = KeyMap(MLM_FROM_HF)
    mlm_head_class: ClassVar[type[BertMLMHead]] = BertMLMHead  # RoBERTa's differs

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.head.mlm = self.mlm_head_class(config, self.backbone.embed.tokens)

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
        logits are then (M, V), one row per masked position in row-major order (cheap MLM pretraining).
        """
        out = self._encode(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_hidden_states,
            labels,
        )
        hidden, labels = _masked_positions(out.last_hidden_state, labels, masked_only)
        logits = self.head.mlm(hidden)
        loss = token_loss(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class BertForNextSentencePrediction(_BertHeadModel):
    """Next-sentence prediction: is text B the continuation of text A? Label 0 = yes, 1 = random."""

    task = "next-sentence"
    hf_architecture = "BertForNextSentencePrediction"
    head_key_map = KeyMap(NSP_FROM_HF)
    reads = "first"
    add_pooler = True

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.head.nsp = Linear(config.hidden_size, 2)

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
        """``labels``: (B,) 0 when B follows A, 1 otherwise. Returns logits (B, 2)."""
        out = self._encode(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_hidden_states,
        )
        logits = self.head.nsp(out.pooler_output)
        loss = F.cross_entropy(logits, labels.view(-1)) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class BertForPreTraining(_BertHeadModel):
    """BERT's pretraining objective: masked LM + next-sentence prediction, losses summed."""

    task = "pretraining"
    hf_architecture = "BertForPreTraining"
    head_key_map = KeyMap({**MLM_FROM_HF, **NSP_FROM_HF})
    add_pooler = True

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.head.mlm = BertMLMHead(config, self.backbone.embed.tokens)
        self.head.nsp = Linear(config.hidden_size, 2)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        masked_only: bool = False,
    ) -> ModelOutput:
        """Returns ``prediction_logits`` (B, T, V), ``seq_relationship_logits`` (B, 2); loss when both labels given.

        ``masked_only``: as for :class:`BertForMaskedLM`, ``prediction_logits`` (M, V) at the masked positions only.
        """
        out = self._encode(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_hidden_states,
            labels,
        )
        hidden, labels = _masked_positions(out.last_hidden_state, labels, masked_only)
        mlm_logits = self.head.mlm(hidden)
        nsp_logits = self.head.nsp(out.pooler_output)
        loss = None
        if labels is not None and next_sentence_label is not None:
            loss = token_loss(mlm_logits, labels) + F.cross_entropy(nsp_logits, next_sentence_label.view(-1))
        return ModelOutput(
            loss=loss,
            prediction_logits=mlm_logits,
            seq_relationship_logits=nsp_logits,
            hidden_states=out.hidden_states,
        )


class BertForSequenceClassification(_BertHeadModel):
    """A linear classifier on the pooled [CLS] state: single-label, multi-label or regression (``problem_type``)."""

    task = "sequence-classification"
    hf_architecture = "BertForSequenceClassification"
    head_key_map = KeyMap(CLASSIFIER_FROM_HF)
    reads = "first"
    add_pooler = True

    multi_sample_dropout: int = 1  # dropout samples of the head per training forward (see multi_sample)

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.head.dropout = self._classifier_dropout()
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
        """Returns logits (B, L). ``labels``: (B,) ids, (B,) floats (regression) or (B, L) multi-hot."""
        out = self._encode(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_hidden_states,
        )
        loss_of = None if labels is None else lambda logits: sequence_classification_loss(self.config, logits, labels)
        logits, loss = multi_sample(self, lambda: self._classify(out), loss_of)
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)

    def _classify(self, out: ModelOutput) -> torch.Tensor:
        """Encoder output -> (B, L) logits: a linear layer on the pooled [CLS] state."""
        return self.head.classifier(self.head.dropout(out.pooler_output))


class BertForTokenClassification(_BertHeadModel):
    """A linear classifier on every token (NER, tagging)."""

    task = "token-classification"
    hf_architecture = "BertForTokenClassification"
    head_key_map = KeyMap(CLASSIFIER_FROM_HF)

    multi_sample_dropout: int = 1  # dropout samples of the head per training forward (see multi_sample)

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.head.dropout = self._classifier_dropout()
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
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_hidden_states,
            labels,
        )
        loss_of = None if labels is None else lambda logits: token_loss(logits, labels)
        logits, loss = multi_sample(
            self, lambda: self.head.classifier(self.head.dropout(out.last_hidden_state)), loss_of
        )
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class BertForQuestionAnswering(_BertHeadModel):
    """Extractive QA: a start score and an end score for every token."""

    task = "question-answering"
    hf_architecture = "BertForQuestionAnswering"
    head_key_map = KeyMap(QA_FROM_HF)
    reads = "all"

    def __init__(self, config: BertConfig):
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
        labels = start_positions if end_positions is not None else None
        out = self._encode(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_hidden_states, labels
        )
        start_logits, end_logits = self.head.qa_outputs(out.last_hidden_state).unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = span_loss(start_logits, end_logits, start_positions, end_positions)
        return ModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits, hidden_states=out.hidden_states)


class BertForMultipleChoice(_BertHeadModel):
    """Multiple choice: each (context, choice) pair is encoded; a linear layer scores its pooled state."""

    task = "multiple-choice"
    hf_architecture = "BertForMultipleChoice"
    head_key_map = KeyMap(CLASSIFIER_FROM_HF)
    reads = "first"
    add_pooler = True

    multi_sample_dropout: int = 1  # dropout samples of the head per training forward (see multi_sample)

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.head.dropout = self._classifier_dropout()
        self.head.classifier = Linear(config.hidden_size, 1)

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
        """Inputs are (B, N, T) (embeddings (B, N, T, C)); returns logits (B, N); ``labels``: (B,) the right choice."""
        ref = input_ids if input_ids is not None else inputs_embeds
        B, N = ref.shape[:2]

        flat = flatten_choices(B, N, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        out = self._encode(*flat, output_hidden_states)
        loss_of = None if labels is None else lambda logits: F.cross_entropy(logits, labels.view(-1))
        logits, loss = multi_sample(
            self, lambda: self.head.classifier(self.head.dropout(out.pooler_output)).view(B, N), loss_of
        )
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


TASKS: dict[str, type[BertPreTrainedModel]] = {
    cls.task: cls
    for cls in (
        BertModel,
        BertForMaskedLM,
        BertForNextSentencePrediction,
        BertForPreTraining,
        BertForSequenceClassification,
        BertForTokenClassification,
        BertForQuestionAnswering,
        BertForMultipleChoice,
    )
}
