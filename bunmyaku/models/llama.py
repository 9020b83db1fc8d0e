"""Llama (Touvron et al. 2023): a pre-norm decoder with RMSNorm, rotary positions, SwiGLU and grouped-query attention.

Notation: B batch, T new positions, S cached + new positions, C hidden size, V vocabulary, L labels.

    input_ids -> token embeddings                                           (no position embeddings)
        -> num_layers x pre-LN Block:                                       (layers.Block)
               x = x + attn(rmsnorm(x))   causal, RoPE on q and k, K <= H key/value heads
               x = x + swiglu(rmsnorm(x))
        -> RMSNorm -> last_hidden_state (B, T, C)

Positions enter only through the rotation of queries and keys (Su et al. 2021), so they default to
``positions_from_mask``: with left padding, every row's first real token is position 0 and a padded
batch gives the same outputs as its rows one by one.

Heads: causal LM (with a KV cache for generation; the LM head tied to the embeddings or not), sequence
classification on the last real token, token classification, extractive QA. Llama 3.1's RoPE scaling
(``rope_scaling={"rope_type": "llama3", ...}``) is supported; other scaling types raise ``ValueError``.
GGUF files (llama.cpp) load through :func:`from_gguf`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from bunmyaku.hub import KeyMap
from bunmyaku.models.attention import KVCache, RotaryEmbedding, causal_mask, positions_from_mask
from bunmyaku.models.base import GenerationMixin, ModelOutput, PreTrainedModel, _resolve_dtype
from bunmyaku.models.config import LayerConfig, ModelConfig
from bunmyaku.models.heads import (
    causal_lm_output,
    check_logits_to_keep,
    sequence_classification_loss,
    span_loss,
    token_loss,
)
from bunmyaku.models.layers import Block, RMSNorm, activation, lm_head
from bunmyaku.models.linear import Linear

ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class LlamaConfig(ModelConfig):
    """Llama hyper-parameters; defaults are Llama-2-7B."""

    model_type: ClassVar[str] = "llama"
    HF_NAMES: ClassVar[dict[str, str]] = {
        "num_layers": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "num_kv_heads": "num_key_value_heads",
        "max_seq_len": "max_position_embeddings",
        "norm_eps": "rms_norm_eps",
    }
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None means num_heads (multi-head attention); fewer is grouped-query
    head_dim: int | None = None  # None means hidden_size // num_heads
    intermediate_size: int = 11008
    hidden_act: str = "silu"
    max_seq_len: int = 2048
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None, or {"rope_type": "llama3", "factor": ..., ...}
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    classifier_dropout: float | None = None  # token classification; None means 0.1, as in HF

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even: RoPE rotates pairs of channels")
        self.rope_scaling = _check_rope_scaling(self.rope_scaling)
        activation(self.hidden_act)

    def layer_config(self, layer_idx: int) -> LayerConfig:
        """What each block reads: pre-norm (x + f(norm(x))) with RMSNorm, a SwiGLU MLP, grouped-query attention."""
        return LayerConfig(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            pre_norm=True,
            norm="rmsnorm",
            norm_eps=self.norm_eps,
            mlp="swiglu",
            mlp_bias=self.mlp_bias,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            attention_bias=self.attention_bias,
            attention_dropout=self.attention_dropout,
            attn_implementation=self.attn_implementation,
        )

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Read ``config.json``; transformers >= 5 writes ``rope_parameters`` (theta and scaling together)."""
        hf = dict(hf)
        rope = hf.pop("rope_parameters", None)
        if rope:
            rope = dict(rope)
            hf["rope_theta"] = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
            hf["rope_scaling"] = rope
        return super().from_hf(hf)


def _check_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """Normalise a HF ``rope_scaling`` dict: None for plain RoPE, else the llama3 parameters, validated."""
    if not scaling:
        return None
    scaling = dict(scaling)
    legacy_type = scaling.pop("type", "default")  # the key's name in older configs
    rope_type = scaling.pop("rope_type", legacy_type)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported; bunmyaku's Llama knows {list(ROPE_TYPES)}")
    if rope_type == "default":
        return None
    missing = [key for key in _LLAMA3_KEYS if key not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type 'llama3' lacks {missing}")
    return {"rope_type": rope_type, **scaling}


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's RoPE scaling: keep fast rotations, slow slow ones down by ``factor``, blend in between.

    Frequencies whose wavelength fits many times in the original context are left alone (they encode local
    order); those with wavelengths longer than the context are divided by ``factor``, so that the longer
    context maps into angles the model has seen; the band between is interpolated linearly in 1 / wavelength.

    Args:
        inv_freq: (D/2,) rotation frequencies, theta^(-2i/D).
        scaling: ``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``.

    Returns:
        (D/2,) rescaled frequencies.
    """
    factor = scaling["factor"]
    context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = context / scaling["low_freq_factor"]
    high_freq_wavelen = context / scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (context / wavelen - scaling["low_freq_factor"]) / (
        scaling["high_freq_factor"] - scaling["low_freq_factor"]
    )
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, blended, scaled)


class LlamaRotaryEmbedding(RotaryEmbedding):
    """RoPE with base ``rope_theta``, its frequencies rescaled when the config asks for llama3 scaling."""

    def __init__(self, config: LlamaConfig):
        super().__init__(config.head_dim, config.rope_theta)
        if config.rope_scaling is not None:  # "llama3", the one scaling type the config accepts
            self.inv_freq = llama3_inv_freq(self.inv_freq, config.rope_scaling)


LLAMA_FROM_HF: dict[str, str | None] = {
    "embed_tokens.weight": "embed.weight",
    "norm.weight": "norm.weight",
    "layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    "layers.{}.self_attn.rotary_emb.inv_freq": None,  # a buffer older checkpoints saved, rebuilt from the config
}
for _hf, _ours in [
    ("self_attn.q_proj", "attn.q_proj"),
    ("self_attn.k_proj", "attn.k_proj"),
    ("self_attn.v_proj", "attn.v_proj"),
    ("self_attn.o_proj", "attn.out_proj"),
    ("mlp.gate_proj", "mlp.fc_gate"),
    ("mlp.up_proj", "mlp.fc_in"),
    ("mlp.down_proj", "mlp.fc_out"),
]:
    for _p in ("weight", "bias"):  # biases only with attention_bias / mlp_bias
        LLAMA_FROM_HF[f"layers.{{}}.{_hf}.{_p}"] = f"layers.{{}}.{_ours}.{_p}"

# HF keeps the base under ``model.``, except in LlamaForQuestionAnswering, which kept GPT-2's ``transformer.``
_HF_BASE_PREFIXES = ("model.", "transformer.")


class LlamaPreTrainedModel(PreTrainedModel):
    """Shared by Llama's base model and heads: config class and the checkpoint key map."""

    config_class = LlamaConfig
    base_key_map = KeyMap(LLAMA_FROM_HF)
    hf_base_prefix = "model."

    @classmethod
    def preprocess_hf(cls, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accept the base under either HF prefix, so a QA checkpoint loads into a causal LM and back."""
        renamed = {}
        for key, tensor in hf_state.items():
            for prefix in _HF_BASE_PREFIXES:
                if key.startswith(prefix):
                    key = cls.hf_base_prefix + key[len(prefix) :]
                    break
            renamed[key] = tensor
        return renamed


class LlamaModel(LlamaPreTrainedModel):
    """The decoder: token embeddings, pre-norm blocks with RoPE, a final RMSNorm."""

    task = "base"
    hf_architecture = "LlamaModel"
    our_base_prefix = ""

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.rotary = LlamaRotaryEmbedding(config)
        self.layers = nn.ModuleList([Block(config.layer_config(i), i) for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """Decode a batch of new positions, attending to the cached ones.

        Args:
            input_ids: (B, T) token ids of the new positions.
            attention_mask: (B, S) 1 for real tokens, 0 for (left) padding, covering cached and new positions.
            position_ids: (B, T); default: counted from each row's first real token.
            past_key_values: a :class:`KVCache` holding the earlier positions; it is extended in place.
            use_cache: start a new cache when ``past_key_values`` is None, and return it.
            inputs_embeds: (B, T, C) instead of ``input_ids``.
            output_hidden_states: also return the embeddings and every layer's output (the last one normed, as in HF).

        Returns:
            ``last_hidden_state`` (B, T, C), ``past_key_values`` (the cache, when one is used), ``hidden_states``.
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        T = x.size(1)
        cache = KVCache() if use_cache and past_key_values is None else past_key_values
        past = len(cache) if cache is not None else 0
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, T, past, x.device)
        mask = causal_mask(attention_mask, T, past + T, x.device)
        rotary = self.rotary(position_ids, x.dtype)
        hidden = [] if output_hidden_states else None
        for block in self.layers:
            if hidden is not None:
                hidden.append(x)
            x = block(x, mask, is_causal=mask is None, rotary=rotary, cache=cache)
        x = self.norm(x)
        if hidden is not None:
            hidden.append(x)
        return ModelOutput(
            last_hidden_state=x, past_key_values=cache, hidden_states=tuple(hidden) if hidden is not None else None
        )


class _LlamaHeadModel(LlamaPreTrainedModel):
    """A head on top of ``self.backbone``; subclasses set the key map and build ``self.head``."""

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.backbone = LlamaModel(config)
        self.head = nn.Module()

    def _decode(self, input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states, **cache):
        return self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            **cache,
        )


class LlamaForCausalLM(GenerationMixin, _LlamaHeadModel):
    """Next-token prediction; the LM head is the embedding matrix when ``tie_word_embeddings``."""

    task = "causal-lm"
    hf_architecture = "LlamaForCausalLM"
    head_key_map = KeyMap({"lm_head.weight": "head.lm_head.weight"})

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.head.lm_head = lm_head(config)
        self.tie_weights()

    def get_output_embeddings(self) -> Linear:
        return self.head.lm_head

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """Logits for the next token at every new position.

        Args:
            input_ids, attention_mask, position_ids, past_key_values, use_cache, inputs_embeds: as in
                :meth:`LlamaModel.forward`.
            labels: (B, T) the input ids themselves, -100 where not scored; shifted inside, as in HF, so
                position t is scored on token t + 1.
            logits_to_keep: > 0 computes logits for the last that many positions only (generation needs one:
                the vocabulary projection of a whole prompt is wasted); 0 for all. Not with ``labels``.

        Returns:
            ``logits`` (B, T, V) (T = ``logits_to_keep`` when set), ``loss``, ``past_key_values``, ``hidden_states``.

        Raises:
            ValueError: ``logits_to_keep`` together with ``labels``.
        """
        check_logits_to_keep(logits_to_keep, labels)
        out = self._decode(
            input_ids,
            attention_mask,
            position_ids,
            inputs_embeds,
            output_hidden_states,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        return causal_lm_output(self.head.lm_head, out, labels, logits_to_keep)


class LlamaForSequenceClassification(_LlamaHeadModel):
    """A linear score (no bias) on the last real token: single-label, multi-label or regression."""

    task = "sequence-classification"
    hf_architecture = "LlamaForSequenceClassification"
    head_key_map = KeyMap({"score.weight": "head.score.weight"})

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.head.score = Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """Returns logits (B, L). ``labels``: (B,) ids, (B,) floats (regression) or (B, L) multi-hot.

        The last real token is the rightmost one that is not ``pad_token_id`` (HF's rule, see
        :meth:`~bunmyaku.models.base.PreTrainedModel.last_token_index`), so left and right padding both work.
        """
        out = self._decode(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states)
        h = out.last_hidden_state
        B, T = h.shape[:2]
        logits = self.head.score(h[torch.arange(B, device=h.device), self.last_token_index(input_ids, B, T)])  # (B, L)
        loss = sequence_classification_loss(self.config, logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class LlamaForTokenClassification(_LlamaHeadModel):
    """A linear classifier on every token (NER, tagging)."""

    task = "token-classification"
    hf_architecture = "LlamaForTokenClassification"
    head_key_map = KeyMap({"score.weight": "head.score.weight", "score.bias": "head.score.bias"})

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        p = config.classifier_dropout
        self.head.dropout = nn.Dropout(0.1 if p is None else p)
        self.head.score = Linear(config.hidden_size, config.num_labels)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """Returns logits (B, T, L). ``labels``: (B, T) tag ids, -100 on positions not scored."""
        out = self._decode(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states)
        logits = self.head.score(self.head.dropout(out.last_hidden_state))
        loss = token_loss(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class LlamaForQuestionAnswering(_LlamaHeadModel):
    """Extractive QA: a start score and an end score for every token."""

    task = "question-answering"
    hf_architecture = "LlamaForQuestionAnswering"
    hf_base_prefix = "transformer."
    head_key_map = KeyMap({"qa_outputs.weight": "head.qa_outputs.weight", "qa_outputs.bias": "head.qa_outputs.bias"})

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.head.qa_outputs = Linear(config.hidden_size, 2)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """Returns ``start_logits`` and ``end_logits`` (B, T); loss when both positions (B,) are given."""
        out = self._decode(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states)
        start_logits, end_logits = self.head.qa_outputs(out.last_hidden_state).unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = span_loss(start_logits, end_logits, start_positions, end_positions)
        return ModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits, hidden_states=out.hidden_states)


TASKS: dict[str, type[LlamaPreTrainedModel]] = {
    cls.task: cls
    for cls in (
        LlamaModel,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        LlamaForTokenClassification,
        LlamaForQuestionAnswering,
    )
}


def from_gguf(
    path: str | os.PathLike,
    task: str = "causal-lm",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    ignore_mismatched_sizes: bool = False,
    **config_overrides: Any,
) -> LlamaPreTrainedModel:
    """Load a llama.cpp GGUF file (quantized weights are dequantized) into a Llama model.

    Args:
        path: the ``.gguf`` file.
        task: which head; a head other than ``causal-lm`` / ``base`` starts newly initialised.
        dtype: torch dtype or its name; default float32 (the dequantized weights).
        device: where to put the model.
        ignore_mismatched_sizes: as in :meth:`~bunmyaku.models.base.PreTrainedModel.from_pretrained`.
        config_overrides: config fields to change, e.g. ``num_labels=3`` or ``attn_implementation="eager"``.

    Returns:
        The model in eval mode.

    Raises:
        ValueError: an unknown task, or a file :func:`bunmyaku.hub.gguf.read_gguf` cannot read as Llama.
    """
    from bunmyaku.hub.gguf import read_gguf

    if task not in TASKS:
        raise ValueError(f"llama has no {task!r} head; available: {sorted(TASKS)}")
    hf_config, hf_state = read_gguf(path)
    cls = TASKS[task]
    return cls.from_hf_state_dict(
        cls.configure(hf_config, **config_overrides),
        hf_state,
        source=str(path),
        dtype=_resolve_dtype(dtype, hf_config),
        device=device,
        ignore_mismatched_sizes=ignore_mismatched_sizes,
        assign=True,  # read_gguf's tensors are copies nobody else holds
    )
