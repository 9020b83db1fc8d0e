"""The Transformer (Vaswani et al. 2017, "Attention Is All You Need"): the original encoder-decoder.

It reads and writes Hugging Face MarianMT checkpoints (``model_type: marian``), which are this model
trained for translation by Marian NMT (Junczys-Dowmunt et al. 2018).

Notation: B batch, S source length, T target length (new positions), P cached target positions,
C model width (d_model), V vocabulary, N beams, W beam candidates ranked per step.

::

    source ids (B, S)                                 target ids (B, T), shifted right
          |                                                  |
    tokens * sqrt(C) + sinusoids  (§3.4, §3.5)         tokens * sqrt(C) + sinusoids
          |                                                  |
    +-------------------------------+              +-------------------------------------+
    | self-attention  -> add & norm |              | masked self-attention -> add & norm |
    | feed-forward    -> add & norm |  memory      | cross-attention       -> add & norm |
    +-------------------------------+ (B, S, C) -> |   (queries: target, keys: memory)   |
          x encoder_num_layers                     | feed-forward          -> add & norm |
                                                   +-------------------------------------+
                                                         x decoder_num_layers
                                                                 |
                                          h E^T + final_logits_bias -> logits (B, T, V)

Every sub-layer is post-LN, ``LayerNorm(x + Sublayer(x))`` (§3.1), so there is no final norm.
Where Marian checkpoints depart from the paper: the sinusoids put all sines before all cosines
instead of interleaving them, scaling the embeddings by sqrt(C) is optional (``scale_embedding``),
and the output layer has a bias (``final_logits_bias``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from bunmyaku.hub import CheckpointError, KeyMap
from bunmyaku.models.attention import KVCache, causal_mask, padding_mask, sinusoidal_positions
from bunmyaku.models.base import GenerationMixin, ModelOutput, PreTrainedModel
from bunmyaku.models.config import LayerConfig, ModelConfig
from bunmyaku.models.generation import BeamRules, beam_search, decoding_weights, forbid, penalize_repeats, sample
from bunmyaku.models.heads import IGNORE_INDEX, token_loss
from bunmyaku.models.layers import Block, activation
from bunmyaku.models.linear import Linear, linear

# BART-era Marian config keys that would mean another architecture: key -> the only value we accept
_FIXED_HF_KEYS = {"normalize_before": False, "add_final_layer_norm": False, "normalize_embedding": False}


@dataclass
class TransformerConfig(ModelConfig):
    """Hyper-parameters of the encoder-decoder; defaults are those of ``transformers.MarianConfig``.

    LayerDrop (``encoder_layerdrop`` / ``decoder_layerdrop``) is not implemented: every layer always runs.
    """

    model_type: ClassVar[str] = "marian"
    HF_NAMES: ClassVar[dict[str, str]] = {
        "hidden_size": "d_model",
        "encoder_num_layers": "encoder_layers",
        "decoder_num_layers": "decoder_layers",
        "encoder_num_heads": "encoder_attention_heads",
        "decoder_num_heads": "decoder_attention_heads",
        "encoder_intermediate_size": "encoder_ffn_dim",
        "decoder_intermediate_size": "decoder_ffn_dim",
        "hidden_act": "activation_function",
        "max_seq_len": "max_position_embeddings",
        "initializer_range": "init_std",
    }

    vocab_size: int = 58101
    decoder_vocab_size: int | None = None  # None means vocab_size
    hidden_size: int = 1024
    encoder_num_layers: int = 12
    decoder_num_layers: int = 12
    encoder_num_heads: int = 16
    decoder_num_heads: int = 16
    encoder_intermediate_size: int = 4096
    decoder_intermediate_size: int = 4096
    hidden_act: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    max_seq_len: int = 1024
    initializer_range: float = 0.02
    scale_embedding: bool = False  # multiply token embeddings by sqrt(hidden_size) (§3.4)
    share_encoder_decoder_embeddings: bool = True  # one token matrix for source and target
    tie_word_embeddings: bool = True  # the output layer is the decoder's token matrix (§3.4)
    pad_token_id: int | None = 58100
    eos_token_id: int | list[int] | None = 0
    decoder_start_token_id: int = 58100

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decoder_vocab_size is None:
            self.decoder_vocab_size = self.vocab_size
        for side in ("encoder", "decoder"):
            heads = getattr(self, f"{side}_num_heads")
            if self.hidden_size % heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {side}_num_heads {heads}")
        activation(self.hidden_act)
        if self.share_encoder_decoder_embeddings:
            if self.decoder_vocab_size != self.vocab_size:
                raise ValueError(
                    f"share_encoder_decoder_embeddings=True needs decoder_vocab_size ({self.decoder_vocab_size}) "
                    f"== vocab_size ({self.vocab_size})"
                )
            if not self.tie_word_embeddings:
                # transformers 4.x shares the source and target matrices in this case, 5.x keeps them apart;
                # converted Marian checkpoints never use it, so refuse rather than guess.
                raise ValueError(
                    "share_encoder_decoder_embeddings=True with tie_word_embeddings=False is ambiguous across "
                    "transformers versions; set share_encoder_decoder_embeddings=False for three separate matrices"
                )
        for key, value in _FIXED_HF_KEYS.items():
            if self.extra.get(key, value) != value:
                raise ValueError(f"{key}={self.extra[key]!r} is not the original post-LN Transformer; expected {value}")

    def layer_config(self, side: str) -> LayerConfig:
        """What each block of the ``"encoder"`` or ``"decoder"`` stack reads (the two may differ in heads and
        feed-forward width): post-LN (§3.1: LayerNorm(x + Sublayer(x))), torch's LayerNorm eps as in Marian."""
        return LayerConfig(
            hidden_size=self.hidden_size,
            num_heads=getattr(self, f"{side}_num_heads"),
            intermediate_size=getattr(self, f"{side}_intermediate_size"),
            hidden_act=self.hidden_act,
            pre_norm=False,
            norm_eps=1e-5,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            activation_dropout=self.activation_dropout,
            attn_implementation=self.attn_implementation,
        )


class TransformerEmbeddings(nn.Module):
    """Token embeddings (times sqrt(C) when ``scale_embedding``) plus fixed sinusoidal positions, then dropout.

    Args:
        config: the hyper-parameters.
        tokens: the token matrix, possibly shared with the other stack and the output layer.
    """

    def __init__(self, config: TransformerConfig, tokens: nn.Embedding):
        super().__init__()
        self.tokens = tokens
        self.scale = math.sqrt(config.hidden_size) if config.scale_embedding else 1.0
        # §3.5: fixed, not learned, so they are rebuilt rather than stored in checkpoints (Marian's layout)
        positions = sinusoidal_positions(config.max_seq_len, config.hidden_size, interleave=False)
        self.register_buffer("positions", positions, persistent=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, past_len: int = 0) -> torch.Tensor:
        """(B, T) ids at positions past_len .. past_len + T - 1 -> (B, T, C)."""
        end = past_len + input_ids.size(1)
        if end > self.positions.size(0):
            raise ValueError(f"position {end - 1} is past max_seq_len {self.positions.size(0)}")
        x = self.tokens(input_ids) * self.scale
        return self.dropout(x + self.positions[past_len:end])  # §5.4: dropout on the sums


class TransformerEncoder(nn.Module):
    """Embeddings, then ``encoder_num_layers`` post-LN blocks of self-attention and feed-forward."""

    def __init__(self, config: TransformerConfig, tokens: nn.Embedding):
        super().__init__()
        layer = config.layer_config("encoder")
        self.embed = TransformerEmbeddings(config, tokens)
        self.layers = nn.ModuleList([Block(layer, i) for i in range(config.encoder_num_layers)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) source ids, (B, S) 1 for real tokens -> memory (B, S, C)."""
        x = self.embed(input_ids)
        mask = padding_mask(attention_mask)
        for block in self.layers:
            x = block(x, mask)
        return x


class TransformerDecoder(nn.Module):
    """Embeddings, then ``decoder_num_layers`` blocks of masked self-attention, cross-attention, feed-forward."""

    def __init__(self, config: TransformerConfig, tokens: nn.Embedding):
        super().__init__()
        layer = config.layer_config("decoder")
        self.embed = TransformerEmbeddings(config, tokens)
        self.layers = nn.ModuleList([Block(layer, i, cross_attention=True) for i in range(config.decoder_num_layers)])

    def forward(
        self,
        input_ids: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Decode T new target positions.

        Args:
            input_ids: (B, T) target ids.
            memory: (B, S, C) encoder output.
            memory_mask: (B, S) 1 for real source tokens.
            attention_mask: (B, P + T) 1 for real target tokens, cached ones included.
            cache: self-attention keys / values of the P earlier positions (extended here), and the
                cross-attention ones, computed from ``memory`` at the first step.

        Returns:
            (B, T, C)
        """
        past_len = len(cache) if cache is not None else 0
        x = self.embed(input_ids, past_len)
        T = x.size(1)
        mask = causal_mask(attention_mask, T, past_len + T, x.device)  # §3.2.3: no peeking at later positions
        cross_mask = padding_mask(memory_mask)
        for block in self.layers:
            x = block(x, mask, is_causal=True, cache=cache, memory=memory, memory_mask=cross_mask)
        return x


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int | None, decoder_start_token_id: int) -> torch.Tensor:
    """Teacher forcing: the decoder reads the target shifted right by one, starting with the start token.

    Args:
        labels: (B, T) target ids, -100 where no loss is taken.

    Returns:
        (B, T) decoder input ids, with -100 replaced by the padding id.
    """
    if pad_token_id is None:
        raise ValueError("pad_token_id is needed to build decoder_input_ids from labels; set it in the config")
    shifted = labels.new_full(labels.shape, decoder_start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)


def encoder_hidden_states(encoder_outputs: Any) -> torch.Tensor:
    """The (B, S, C) memory from what callers pass as ``encoder_outputs``: a tensor, an output record, or a tuple."""
    if isinstance(encoder_outputs, torch.Tensor):
        return encoder_outputs
    if getattr(encoder_outputs, "last_hidden_state", None) is not None:
        return encoder_outputs.last_hidden_state
    return encoder_outputs[0]


def _layer_map(stack: str, cross: bool) -> dict[str, str]:
    """HF -> our names of one stack's per-layer tensors (HF: self_attn, encoder_attn, fc1, fc2; ours: layers.Block)."""
    pairs = [
        ("self_attn.q_proj", "attn.q_proj"),
        ("self_attn.k_proj", "attn.k_proj"),
        ("self_attn.v_proj", "attn.v_proj"),
        ("self_attn.out_proj", "attn.out_proj"),
        ("self_attn_layer_norm", "attn_norm"),
        ("fc1", "mlp.fc_in"),
        ("fc2", "mlp.fc_out"),
        ("final_layer_norm", "mlp_norm"),
    ]
    if cross:
        pairs += [
            ("encoder_attn.q_proj", "cross_attn.q_proj"),
            ("encoder_attn.k_proj", "cross_attn.k_proj"),
            ("encoder_attn.v_proj", "cross_attn.v_proj"),
            ("encoder_attn.out_proj", "cross_attn.out_proj"),
            ("encoder_attn_layer_norm", "cross_norm"),
        ]
    layer = f"{stack}.layers.{{}}"
    return {f"{layer}.{hf}.{p}": f"{layer}.{ours}.{p}" for hf, ours in pairs for p in ("weight", "bias")}


MARIAN_FROM_HF = {
    "shared.weight": "shared.weight",
    "encoder.embed_tokens.weight": "encoder.embed.tokens.weight",
    "decoder.embed_tokens.weight": "decoder.embed.tokens.weight",
    "encoder.embed_positions.weight": None,  # fixed sinusoids, rebuilt on load
    "decoder.embed_positions.weight": None,
    **_layer_map("encoder", cross=False),
    **_layer_map("decoder", cross=True),
}
SEQ2SEQ_LM_FROM_HF = {
    "lm_head.weight": "head.proj.weight",
    "final_logits_bias": "head.final_logits_bias",
}


class TransformerPreTrainedModel(PreTrainedModel):
    """Shared by the base model and the translation head: config class, key map, tied embeddings."""

    config_class = TransformerConfig
    base_key_map = KeyMap(MARIAN_FROM_HF)
    hf_base_prefix = "model."

    @classmethod
    def preprocess_hf(cls, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Check the sinusoids that some checkpoints store: they are rebuilt, so they must be the fixed ones.

        Raises:
            CheckpointError: naming a stored position table that is not Marian's sinusoids.
        """
        for key, tensor in hf_state.items():
            if key.endswith("embed_positions.weight"):
                expected = sinusoidal_positions(*tensor.shape, interleave=False)
                if not torch.allclose(tensor.float(), expected, atol=1e-3):  # 1e-3: fp16 checkpoints round sin / cos
                    raise CheckpointError(f"{key} is not the fixed sinusoidal table this model rebuilds")
        return hf_state

    def tied_weights(self) -> dict[str, str]:
        """Source and target token matrices are one when shared; the output layer is the target one when tied."""
        base = self.our_base_prefix
        tied = {}
        if self.config.share_encoder_decoder_embeddings:
            tied[f"{base}encoder.embed.tokens.weight"] = f"{base}shared.weight"
            tied[f"{base}decoder.embed.tokens.weight"] = f"{base}shared.weight"
        if self.task != "base" and self.config.tie_word_embeddings:
            # the head has no matrix of its own then; a checkpoint's copy (``lm_head.weight``) is skipped
            tied["head.proj.weight"] = f"{base}decoder.embed.tokens.weight"
        return tied


class TransformerModel(TransformerPreTrainedModel):
    """Encoder and decoder without the output layer: returns the decoder's last hidden state."""

    task = "base"
    hf_architecture = "MarianModel"
    our_base_prefix = ""

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        pad = config.pad_token_id
        if config.share_encoder_decoder_embeddings:
            self.shared = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
            source_tokens = target_tokens = self.shared
        else:
            self.shared = None
            source_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
            target_tokens = nn.Embedding(config.decoder_vocab_size, config.hidden_size, padding_idx=pad)
        self.encoder = TransformerEncoder(config, source_tokens)
        self.decoder = TransformerDecoder(config, target_tokens)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) source ids and mask -> memory (B, S, C), the encoder's last hidden state."""
        return self.encoder(input_ids, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: Any = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> ModelOutput:
        """Encode the source (unless ``encoder_outputs`` is given), then decode the target.

        Args:
            input_ids: (B, S) source ids.
            attention_mask: (B, S) 1 for real source tokens, 0 for padding.
            decoder_input_ids: (B, T) target ids, starting with ``decoder_start_token_id``.
            decoder_attention_mask: (B, P + T) 1 for real target tokens; causal masking is always applied.
            encoder_outputs: precomputed memory (B, S, C), or a record / tuple holding it first.
            past_key_values: a :class:`KVCache` of the P earlier target positions, extended in place.
            use_cache: start a new cache when none is given, and return it.

        Returns:
            ``last_hidden_state`` (B, T, C), ``encoder_last_hidden_state`` (B, S, C), ``past_key_values``.
        """
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids is required (or labels, for the seq2seq-lm head)")
        if encoder_outputs is None:
            memory = self.encode(input_ids, attention_mask)
        else:
            memory = encoder_hidden_states(encoder_outputs)
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        x = self.decoder(decoder_input_ids, memory, attention_mask, decoder_attention_mask, cache)
        return ModelOutput(last_hidden_state=x, encoder_last_hidden_state=memory, past_key_values=cache)


class TransformerLMHead(nn.Module):
    """Next-token logits: h W^T + final_logits_bias, W the target token matrix when tied (§3.4).

    Args:
        config: the hyper-parameters.
        target_tokens: the decoder's token embedding, used as W when ``tie_word_embeddings``.
    """

    def __init__(self, config: TransformerConfig, target_tokens: nn.Embedding):
        super().__init__()
        untied = not config.tie_word_embeddings
        self.proj = Linear(config.hidden_size, config.decoder_vocab_size, bias=False) if untied else None
        self.target_tokens = [target_tokens]  # a list, so the tied matrix is not registered (and saved) twice
        self.register_buffer("final_logits_bias", torch.zeros(1, config.decoder_vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, V)"""
        weight = self.target_tokens[0].weight if self.proj is None else self.proj.weight
        return linear(hidden, weight) + self.final_logits_bias


class TransformerForSeq2SeqLM(GenerationMixin, TransformerPreTrainedModel):
    """Translation: the encoder-decoder with its output layer, a loss on ``labels``, and ``generate``."""

    task = "seq2seq-lm"
    hf_architecture = "MarianMTModel"
    head_key_map = KeyMap(SEQ2SEQ_LM_FROM_HF)

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        self.backbone = TransformerModel(config)
        self.head = TransformerLMHead(config, self.backbone.decoder.embed.tokens)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) source ids and mask -> memory (B, S, C), to pass as ``encoder_outputs`` at every decoding step."""
        return self.backbone.encode(input_ids, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: Any = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits for every target position; with ``labels``, the mean cross-entropy over non-ignored tokens.

        Args:
            labels: (B, T) target ids, -100 where no loss is taken. Without ``decoder_input_ids``, the decoder
                reads the labels shifted right (teacher forcing).
            others: as :meth:`TransformerModel.forward`.

        Returns:
            ``logits`` (B, T, V), ``loss``, ``encoder_last_hidden_state`` (B, S, C), ``past_key_values``.
        """
        if labels is not None and decoder_input_ids is None:
            decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        logits = self.head(out.last_hidden_state)
        return ModelOutput(
            loss=token_loss(logits, labels) if labels is not None else None,
            logits=logits,
            past_key_values=out.past_key_values,
            encoder_last_hidden_state=out.encoder_last_hidden_state,
        )

    def next_token_logits(
        self, last_tokens: torch.Tensor, memory: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache
    ) -> torch.Tensor:
        """One decoding step: (B, 1) newest target ids -> (B, V) float32 logits for the next one; extends ``cache``."""
        out = self(
            decoder_input_ids=last_tokens, encoder_outputs=memory, attention_mask=attention_mask, past_key_values=cache
        )
        return out.logits[:, -1].float()

    def _generated_prefix_length(self, input_ids: torch.Tensor) -> int:
        return 1  # the decoder's output starts with its start token, which ``max_length`` counts (as in HF)

    def _generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        bad_token_ids: list[int] | None = None,
        min_new_tokens: int = 0,
        early_stopping: bool = False,
        num_return_sequences: int = 1,
        **choice: Any,
    ) -> torch.Tensor:
        """Translate (``generate``, with HF's keywords): greedy search or sampling, or beam search, with a KV cache.

        ``bad_token_ids`` defaults to the padding id, which Marian checkpoints forbid (it doubles as the start
        token). ``choice``: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``seed``.

        Returns:
            (B, 1 + L) ids: the start token, then the translation; padding after the end-of-sentence token.
        """
        if max_new_tokens < 1 or num_beams < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) and num_beams ({num_beams}) must be at least 1")
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=input_ids.device)
        if bad_token_ids is None:
            bad_token_ids = [] if self.config.pad_token_id is None else [self.config.pad_token_id]
        pad = self._pad_id() if pad_token_id is None else pad_token_id
        memory = self.encode(input_ids, attention_mask)
        with decoding_weights(input_ids.size(0) * num_beams, max_new_tokens):  # CPU: packed weights when batched
            if num_beams == 1:
                return self._greedy_search(
                    memory, attention_mask, max_new_tokens, eos, pad, bad_token_ids, min_new_tokens, **choice
                )
            if choice.get("do_sample") or choice.get("repetition_penalty", 1.0) != 1.0:
                raise ValueError("num_beams > 1 cannot be combined with do_sample or repetition_penalty")
            rules = BeamRules(length_penalty, min_new_tokens, bad_token_ids, early_stopping, num_return_sequences)
            return self._beam_search(memory, attention_mask, max_new_tokens, num_beams, rules, eos, pad)

    def _start_tokens(self, rows: int, device) -> torch.Tensor:
        return torch.full((rows, 1), self.config.decoder_start_token_id, dtype=torch.long, device=device)

    def _pad_id(self) -> int:
        return self.config.pad_token_id if self.config.pad_token_id is not None else self.config.decoder_start_token_id

    def _greedy_search(
        self,
        memory,
        attention_mask,
        max_new_tokens,
        eos,
        pad,
        bad_token_ids,
        min_new_tokens=0,
        do_sample=False,
        temperature=1.0,
        top_k=None,
        top_p=None,
        repetition_penalty=1.0,
        seed=None,
    ) -> torch.Tensor:
        """Take the most likely token (or sample one) at every step; a finished row is padded until all are."""
        tokens = self._start_tokens(memory.size(0), memory.device)  # (B, 1)
        finished = torch.zeros(memory.size(0), dtype=torch.bool, device=memory.device)
        generator = torch.Generator(device=memory.device).manual_seed(seed) if seed is not None else None
        cache = KVCache()
        for i in range(max_new_tokens):
            logits = self.next_token_logits(tokens[:, -1:], memory, attention_mask, cache)  # (B, V)
            if repetition_penalty != 1.0:
                logits = penalize_repeats(logits, tokens, torch.ones_like(tokens), repetition_penalty)
            logits = forbid(logits, bad_token_ids, eos if i < min_new_tokens else None)
            if do_sample:
                next_tokens = sample(logits, temperature, top_k, top_p, generator)  # (B,)
            else:
                next_tokens = logits.argmax(-1)  # (B,)
            next_tokens = next_tokens.masked_fill(finished, pad)
            tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
            finished |= torch.isin(next_tokens, eos)
            if finished.all():
                break
        return tokens

    def _beam_search(self, memory, attention_mask, max_new_tokens, num_beams, rules, eos, pad):
        """Beam search (:func:`bunmyaku.models.generation.beam_search`) over the decoder, the source encoded once."""
        N = num_beams
        memory = memory.repeat_interleave(N, dim=0)  # (B * N, S, C)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(N, dim=0)
        cache = KVCache()

        def step(tokens: torch.Tensor) -> torch.Tensor:
            return self.next_token_logits(tokens[:, -1:], memory, attention_mask, cache)

        start = self._start_tokens(memory.size(0), memory.device)
        return beam_search(
            step,
            cache.reorder,
            start,
            N,
            max_new_tokens,
            eos,
            pad,
            rules,
        )


TASKS: dict[str, type[TransformerPreTrainedModel]] = {
    cls.task: cls for cls in (TransformerModel, TransformerForSeq2SeqLM)
}
