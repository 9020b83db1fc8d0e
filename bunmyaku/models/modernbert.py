"""ModernBERT (Warner et al. 2024): a pre-norm encoder with rotary positions, GeGLU and alternating local / global
attention, for inputs of up to 8,192 tokens.

Notation: B batch, T sequence length, C hidden size, H heads, D head dim, V vocabulary, N real tokens of a packed
batch, W half-window (``local_attention // 2``), L labels.

    input_ids -> token embeddings -> LayerNorm -> dropout                  (no position embeddings)
        -> num_layers x pre-LN layer:
               x = x + attn(norm(x))      RoPE on q and k; layer 0 has no norm here (its input was just normed)
               x = x + geglu(norm(x))     fc_out(act(a) * g), [a, g] = fc_in(x)
        -> LayerNorm -> last_hidden_state (B, T, C)

Layer i is *global* (every query sees every key) when ``i % global_attn_every_n_layers == 0`` and *local*
otherwise: query t sees the keys s with |t - s| <= W, a band of ``local_attention + 1`` positions. Each kind has
its own RoPE base (``global_rope_theta``, ``local_rope_theta``). HF's ``layer_types`` list, when a config has one,
names each layer's kind instead.

A local layer attends through :mod:`bunmyaku.models.sparse_attention`'s sliding window (no global tokens): query
blocks over their own key spans on CPU, a FlexAttention block mask on CUDA, so its cost grows linearly in T and no
(T, T) mask is built. The dense band (:func:`band_mask`) remains only for ``attn_implementation="eager"``, the
reference path.

A right-padded batch runs unpadded (``config.unpad``): the N real tokens are packed into (N, C) and only attention
sees rows, re-padded group by group (:class:`~bunmyaku.models.fastpath.Packing` row groups, CPU) or as a whole batch
(elsewhere), under a key mask (local layers: the window's padding keys). Outputs at padding positions are then zeros; a
head whose loss reads them (labels at padding, QA's softmax over every position) runs the batch padded, as in
:mod:`bunmyaku.models.bert`, so every loss is the one HF computes.

Heads: masked LM (decoder tied to the token embeddings; ``sparse_prediction`` / ``masked_only`` computes logits at
the labelled positions only), sequence classification (``classifier_pooling`` "cls" or "mean"), token
classification, extractive QA, multiple choice. Every head reads the encoder through a prediction head
(dense -> act -> LayerNorm), as in HF; the classification heads take multi-sample dropout. Attention is always
fused, so ``output_attentions=True`` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bunmyaku.hub import KeyMap
from bunmyaku.hub.keymap import linear_map
from bunmyaku.models.attention import ATTENTION_FUNCTIONS, RotaryEmbedding, apply_rotary, eager_attention
from bunmyaku.models.base import ModelOutput, PreTrainedModel, _resized_rows
from bunmyaku.models.config import ModelConfig
from bunmyaku.models.fastpath import Packing
from bunmyaku.models.heads import flatten_choices, multi_sample, sequence_classification_loss, span_loss, token_loss
from bunmyaku.models.layers import activation
from bunmyaku.models.linear import Linear
from bunmyaku.models.sparse_attention import SparsePattern, sparse_attention

LAYER_TYPES = ("full_attention", "sliding_attention")  # HF's names for global and local layers


@dataclass
class ModernBertConfig(ModelConfig):
    """ModernBERT hyper-parameters; defaults are answerdotai/ModernBERT-base."""

    model_type: ClassVar[str] = "modernbert"
    HF_NAMES: ClassVar[dict[str, str]] = {
        "num_layers": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "hidden_act": "hidden_activation",
        "max_seq_len": "max_position_embeddings",
    }
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = (*ModelConfig.RUNTIME_FIELDS, "unpad")
    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152  # each of GeGLU's two halves; fc_in is 2 * intermediate_size wide
    num_layers: int = 22
    num_heads: int = 12
    hidden_act: str = "gelu"
    max_seq_len: int = 8192
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0
    norm_eps: float = 1e-5
    norm_bias: bool = False
    pad_token_id: int | None = 50283
    eos_token_id: int | None = 50282
    bos_token_id: int | None = 50281
    cls_token_id: int | None = 50281
    sep_token_id: int | None = 50282
    attention_bias: bool = False
    attention_dropout: float = 0.0  # on the attention weights and on the attention output
    global_attn_every_n_layers: int = 3
    layer_types: list[str] | None = None  # None: derived from global_attn_every_n_layers
    global_rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    local_attention: int = 128  # the local window: W = local_attention // 2 keys on each side
    embedding_dropout: float = 0.0
    mlp_bias: bool = False
    mlp_dropout: float = 0.0
    decoder_bias: bool = True
    classifier_pooling: str = "cls"  # cls | mean
    classifier_dropout: float = 0.0
    classifier_bias: bool = False
    classifier_activation: str = "gelu"
    sparse_prediction: bool = False  # masked LM with labels: logits at the labelled positions only
    sparse_pred_ignore_index: int = -100
    tie_word_embeddings: bool = True
    unpad: bool = True  # run padded batches on their real tokens only; False: the plain (B, T, C) path

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"head dim {self.hidden_size // self.num_heads} must be even: RoPE rotates pairs")
        if self.global_attn_every_n_layers < 1:
            raise ValueError(f"global_attn_every_n_layers must be >= 1, got {self.global_attn_every_n_layers}")
        if self.layer_types is None:
            n = self.global_attn_every_n_layers
            self.layer_types = [LAYER_TYPES[1] if i % n else LAYER_TYPES[0] for i in range(self.num_layers)]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_layers or any(t not in LAYER_TYPES for t in self.layer_types):
            raise ValueError(
                f"layer_types {self.layer_types}: expected {self.num_layers} entries, each one of {list(LAYER_TYPES)}"
            )
        if self.local_attention < 2:
            raise ValueError(f"local_attention must be >= 2 (a window of W = local_attention // 2 on each side), "
                             f"got {self.local_attention}")  # fmt: skip
        if self.classifier_pooling not in ("cls", "mean"):
            raise ValueError(f"classifier_pooling must be 'cls' or 'mean', got {self.classifier_pooling!r}")
        activation(self.hidden_act)
        activation(self.classifier_activation)

    @property
    def window(self) -> int:
        """W: a local layer's query t sees keys t - W .. t + W."""
        return self.local_attention // 2

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModernBertConfig:
        """Read ``config.json``: transformers >= 5 writes ``rope_parameters`` (one RoPE base per layer type)."""
        hf = dict(hf)
        rope = hf.pop("rope_parameters", None) or {}
        for layer_type, field in (("full_attention", "global_rope_theta"), ("sliding_attention", "local_rope_theta")):
            params = dict(rope.get(layer_type) or {})
            rope_type = params.pop("rope_type", "default")
            if rope_type != "default":
                raise ValueError(f"rope_parameters[{layer_type!r}]: rope_type {rope_type!r} is not supported; "
                                 "bunmyaku's ModernBERT has plain RoPE ('default')")  # fmt: skip
            if "rope_theta" in params:
                hf[field] = params["rope_theta"]
        if hf.get("rope_scaling"):
            raise ValueError(f"rope_scaling {hf['rope_scaling']!r} is not supported by bunmyaku's ModernBERT")
        hf.pop("rope_scaling", None)
        return super().from_hf(hf)

    def to_hf(self) -> dict[str, Any]:
        """Both spellings of the RoPE bases: ``rope_parameters`` (transformers >= 5) and the published
        ``global_rope_theta`` / ``local_rope_theta`` (earlier releases)."""
        out = super().to_hf()
        out["rope_parameters"] = {
            "full_attention": {"rope_theta": self.global_rope_theta, "rope_type": "default"},
            "sliding_attention": {"rope_theta": self.local_rope_theta, "rope_type": "default"},
        }
        return out


class ModernBertEmbeddings(nn.Module):
    """Token embeddings, then LayerNorm and dropout; positions enter through RoPE in attention."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.dropout = nn.Dropout(config.embedding_dropout)

    def forward(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids or (B, T, C) embeddings (or (N,) / (N, C) packed) -> (B, T, C) (or (N, C))."""
        x = self.tokens(input_ids) if inputs_embeds is None else inputs_embeds
        return self.dropout(self.norm(x))


def band_mask(length: int, window: int, device) -> torch.Tensor:
    """(T, T) bool, True where |t - s| <= window: the keys s a local layer's query t sees (the eager path's)."""
    # built as a bool matrix directly: an integer distance matrix would take 8 bytes per pair (512 MB at 8,192)
    return torch.ones(length, length, dtype=torch.bool, device=device).tril(window).triu(-window)


def local_mask(
    key_mask: torch.Tensor | None, length: int, window: int, eager: bool, device
) -> torch.Tensor | SparsePattern | None:
    """What a local layer attends under, over a (B, T) batch: the window as a :class:`SparsePattern` (linear in T),
    or for the eager path the dense (B or 1, 1, T, T) band and key mask; just ``key_mask`` when the window covers
    every key.

    Args:
        key_mask: (B, 1, 1, T) bool real keys, or None.
    """
    if length - 1 <= window:
        return key_mask
    if not eager:
        valid = None if key_mask is None else key_mask[:, 0, 0]  # (B, T)
        # padding queries attend as real ones do: on the padded path HF's outputs there reach QA's loss
        return SparsePattern(window, valid, attend_from_padding=True)
    band = band_mask(length, window, device)  # (T, T)
    return band if key_mask is None else key_mask & band


class ModernBertAttention(nn.Module):
    """Self-attention with fused q, k, v projections, RoPE, and for a local layer a band of 2W + 1 keys."""

    def __init__(self, config: ModernBertConfig, layer_idx: int):
        super().__init__()
        C = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, C // config.num_heads
        self.window = config.window if config.layer_types[layer_idx] == "sliding_attention" else None
        self.dropout = config.attention_dropout
        self.attend = ATTENTION_FUNCTIONS[config.attn_implementation]
        self.qkv_proj = Linear(C, 3 * C, bias=config.attention_bias)  # q, k, v side by side
        self.out_proj = Linear(C, C, bias=config.attention_bias)
        self.out_dropout = nn.Dropout(config.attention_dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor],
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C) with ``mask`` from :func:`local_mask` (a local layer) or a bool key mask broadcastable to
        (B, H, T, T), and ``rotary`` cos, sin (B or 1, 1, T, D); or (N, C) packed real tokens with ``packing`` and
        cos, sin (N, 1, D).

        Returns:
            (B, T, C), or (N, C) with ``packing``.
        """
        H, D = self.num_heads, self.head_dim
        dropout_p = self.dropout if self.training else 0.0
        if packing is not None:
            return self.out_dropout(self.out_proj(self._packed(x, rotary, packing, dropout_p)))
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        y = self._attend(q, k, v, mask, dropout_p)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, C): heads merged
        return self.out_dropout(self.out_proj(y))

    def _attend(self, q, k, v, mask: torch.Tensor | SparsePattern | None, dropout_p: float) -> torch.Tensor:
        """(B, H, T, D) x 3 -> (B, H, T, D): the sliding window for a :class:`SparsePattern`, else dense."""
        if isinstance(mask, SparsePattern):
            return sparse_attention(q, k, v, mask, dropout_p=dropout_p)
        return self.attend(q, k, v, mask=mask, dropout_p=dropout_p)

    def _packed(self, x: torch.Tensor, rotary, packing: Packing, dropout_p: float) -> torch.Tensor:
        """(N, C) real tokens -> (N, C) attention outputs before the output projection, each row attending
        within itself: row group by row group on CPU, else the batch re-padded as a whole."""
        N, H, D = x.size(0), self.num_heads, self.head_dim
        q, k, v = self.qkv_proj(x).view(N, 3, H, D).unbind(1)  # 3 x (N, H, D)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)  # rotary: (N, 1, D)
        q, k, v = q.reshape(N, H * D), k.reshape(N, H * D), v.reshape(N, H * D)
        if packing.groups is None:
            y = self._rows(q, k, v, packing.pad, packing.batch, packing.length, packing.mask, dropout_p)
            return packing.unpad(y)  # (N, H * D)
        out = q.new_empty(N, H * D)
        for group in packing.groups:
            y = self._rows(q, k, v, group.pad, group.rows.numel(), group.length, group.mask, dropout_p)
            out.index_copy_(0, group.tokens, group.unpad(y))
        return out

    def _rows(self, q, k, v, pad, b: int, L: int, key_mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
        """Attention over b rows re-padded to length L by ``pad``: (N, H * D) x 3 -> (b, L, H * D)."""
        H, D = self.num_heads, self.head_dim
        q, k, v = (pad(t).view(b, L, H, D).transpose(1, 2) for t in (q, k, v))  # (b, H, L, D)
        mask = key_mask  # (b, 1, 1, L) or None
        if self.window is not None:
            mask = local_mask(key_mask, L, self.window, self.attend is eager_attention, q.device)
        y = self._attend(q, k, v, mask, dropout_p)  # (b, H, L, D)
        return y.transpose(1, 2).reshape(b, L, H * D)


class GeGLU(nn.Module):
    """Gated feed-forward (Shazeer 2020) with GELU: fc_out(act(a) * g), where [a, g] = fc_in(x), one GEMM."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.fc_in = Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.fc_out = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = activation(config.hidden_act)
        self.dropout = nn.Dropout(config.mlp_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.fc_in(x).chunk(2, dim=-1)
        return self.fc_out(self.dropout(self.act(a) * g))


class ModernBertLayer(nn.Module):
    """One pre-LN layer: x + attn(norm(x)), then x + geglu(norm(x)). Layer 0's attention norm is the identity:
    the embeddings' LayerNorm has just normed its input."""

    def __init__(self, config: ModernBertConfig, layer_idx: int):
        super().__init__()
        C, eps, bias = config.hidden_size, config.norm_eps, config.norm_bias
        self.attn_norm = nn.Identity() if layer_idx == 0 else nn.LayerNorm(C, eps=eps, bias=bias)
        self.attn = ModernBertAttention(config, layer_idx)
        self.mlp_norm = nn.LayerNorm(C, eps=eps, bias=bias)
        self.mlp = GeGLU(config)
        self.is_global = self.attn.window is None
        self.gradient_checkpointing = False

    def _forward(self, x, mask, rotary, packing):
        x = x + self.attn(self.attn_norm(x), mask, rotary, packing)
        return x + self.mlp(self.mlp_norm(x))

    def forward(self, x, mask, rotary, packing: Packing | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C), or (N, C) -> (N, C) with ``packing``; arguments as :class:`ModernBertAttention`."""
        if self.gradient_checkpointing and self.training:
            return checkpoint(self._forward, x, mask, rotary, packing, use_reentrant=False)
        return self._forward(x, mask, rotary, packing)


MODERNBERT_FROM_HF = {
    "embeddings.tok_embeddings.weight": "embed.tokens.weight",
    **linear_map("embeddings.norm", "embed.norm"),
    **linear_map("final_norm", "norm"),
}
for _hf, _ours in [
    ("attn_norm", "attn_norm"),  # absent in layer 0
    ("attn.Wqkv", "attn.qkv_proj"),
    ("attn.Wo", "attn.out_proj"),
    ("mlp_norm", "mlp_norm"),
    ("mlp.Wi", "mlp.fc_in"),
    ("mlp.Wo", "mlp.fc_out"),
]:
    for _p in ("weight", "bias"):  # biases only with norm_bias / attention_bias / mlp_bias
        MODERNBERT_FROM_HF[f"layers.{{}}.{_hf}.{_p}"] = f"layers.{{}}.{_ours}.{_p}"

PREDICTION_HEAD_FROM_HF = {
    **linear_map("head.dense", "head.transform.dense"),
    **linear_map("head.norm", "head.transform.norm"),
}
MLM_FROM_HF = {**PREDICTION_HEAD_FROM_HF, **linear_map("decoder", "head.decoder")}
CLASSIFIER_FROM_HF = {**PREDICTION_HEAD_FROM_HF, **linear_map("classifier", "head.classifier")}


class ModernBertPreTrainedModel(PreTrainedModel):
    """Shared by ModernBERT's base model and heads: config class, key map, initialisation."""

    config_class = ModernBertConfig
    base_key_map = KeyMap(MODERNBERT_FROM_HF)
    hf_base_prefix = "model."

    def init_weights(self) -> None:
        """HF's initialisation: truncated normals (cut at ``initializer_cutoff_factor`` std), the output projections
        of each residual branch scaled down by sqrt(2 * num_layers), classifiers at 1 / sqrt(C); norms at one."""
        config = self.config
        std_in = config.initializer_range
        std_out = config.initializer_range / (2.0 * config.num_layers) ** 0.5
        std_final = config.hidden_size**-0.5

        def init(module: nn.Module, std: float) -> None:
            cut = config.initializer_cutoff_factor * std
            nn.init.trunc_normal_(module.weight, std=std, a=-cut, b=cut)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

        for name, module in self.named_modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                init(module, std_in)
            elif isinstance(module, Linear) and module.weight.device.type != "meta":
                final = name.endswith("classifier")
                out = name.endswith(("out_proj", "fc_out", "transform.dense", "decoder"))
                init(module, std_final if final else std_out if out else std_in)
        self.tie_weights()

    def __call__(self, *args: Any, output_attentions: bool = False, **kwargs: Any) -> Any:
        """``forward``; ``output_attentions=True`` is refused rather than answered with no attentions."""
        if output_attentions:
            raise ValueError(
                f"{type(self).__name__} cannot return attention weights (output_attentions=True): its attention "
                "is fused (SDPA); run transformers' ModernBERT with attn_implementation='eager' for them"
            )
        return super().__call__(*args, **kwargs)

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        """Recompute each layer's activations during backward instead of keeping them."""
        self.config.gradient_checkpointing = enable
        for module in self.modules():
            if isinstance(module, ModernBertLayer):
                module.gradient_checkpointing = enable


def _right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row's real tokens come first: packing keeps their distances, which the band mask reads."""
    lengths = attention_mask.sum(-1, keepdim=True)  # (B, 1)
    prefix = torch.arange(attention_mask.size(1), device=lengths.device) < lengths  # (B, T)
    return bool((attention_mask.bool() == prefix).all())


class ModernBertModel(ModernBertPreTrainedModel):
    """The encoder: embeddings, layers, final LayerNorm."""

    task = "base"
    hf_architecture = "ModernBertModel"
    our_base_prefix = ""

    def __init__(self, config: ModernBertConfig):
        super().__init__(config)
        D = config.hidden_size // config.num_heads
        self.embed = ModernBertEmbeddings(config)
        self.layers = nn.ModuleList([ModernBertLayer(config, i) for i in range(config.num_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.rotary_global = RotaryEmbedding(D, config.global_rope_theta)
        self.rotary_local = RotaryEmbedding(D, config.local_rope_theta)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed.tokens

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        unpad: bool | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Encode a batch (unpadded inside when it is right-padded and ``config.unpad``).

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1 for real tokens, 0 for padding.
            position_ids: (B, T) RoPE positions; default 0..T-1 (padding counted, as in HF).
            inputs_embeds: (B, T, C) instead of ``input_ids``.
            output_hidden_states: also return the embeddings and every layer's output (the last one normed).
            unpad: run on the real tokens only (outputs at padding are then zeros); default ``config.unpad``.
            token_type_ids: accepted and ignored, as a tokenizer of BERT's kind returns them: ModernBERT has no
                segment embeddings (the separator token tells a pair's texts apart).

        Returns:
            ``last_hidden_state`` (B, T, C), ``hidden_states``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        ref = input_ids if input_ids is not None else inputs_embeds
        T, device = ref.size(1), ref.device
        if position_ids is None:
            position_ids = torch.arange(T, device=device)[None]  # (1, T)
        unpad = self.config.unpad if unpad is None else unpad
        padded = attention_mask is not None and not bool(attention_mask.all())
        packing = Packing.from_mask(attention_mask) if padded and unpad and _right_padded(attention_mask) else None
        if packing is not None:
            input_ids = None if input_ids is None else packing.unpad(input_ids)  # (N,)
            inputs_embeds = None if inputs_embeds is None else packing.unpad(inputs_embeds)  # (N, C)
            positions = packing.unpad(position_ids)[None]  # (1, N)
        else:
            positions = position_ids
        x = self.embed(input_ids, inputs_embeds)  # (B, T, C), or (N, C) packed
        rotary = {True: self.rotary_global(positions, x.dtype), False: self.rotary_local(positions, x.dtype)}
        if packing is not None:
            rotary = {kind: (cos[0].transpose(0, 1), sin[0].transpose(0, 1)) for kind, (cos, sin) in rotary.items()}
            masks = {True: None, False: None}  # each row group builds its own
        else:
            masks = self._masks(attention_mask if padded else None, T, device)
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, masks[layer.is_global], rotary[layer.is_global], packing)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x  # as HF: the last hidden state is the normed one
        if packing is not None:
            x = packing.pad(x)  # (B, T, C)
            hidden = [packing.pad(h) for h in hidden] if hidden is not None else None
        return ModelOutput(last_hidden_state=x, hidden_states=tuple(hidden) if hidden is not None else None)

    def _masks(
        self, attention_mask: torch.Tensor | None, T: int, device
    ) -> dict[bool, torch.Tensor | SparsePattern | None]:
        """{global: (B, 1, 1, T) key mask or None, local: :func:`local_mask` (one pattern shared by the layers)}."""
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        eager = self.config.attn_implementation == "eager"
        return {True: key_mask, False: local_mask(key_mask, T, self.config.window, eager, device)}


class PredictionHead(nn.Module):
    """dense -> activation -> LayerNorm: what every ModernBERT head reads the encoder through."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
        self.act = activation(config.classifier_activation)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


class _ModernBertHeadModel(ModernBertPreTrainedModel):
    """A head on top of ``self.backbone``; subclasses set the key map and build the rest of ``self.head``."""

    # the positions a head's loss reads: "labelled" (those its (B, T) labels score), "all" (QA: a softmax over every
    # position, padding included), "real" (pooled from real positions only)
    reads: ClassVar[str] = "real"

    def __init__(self, config: ModernBertConfig):
        super().__init__(config)
        self.backbone = ModernBertModel(config)
        self.head = nn.Module()
        self.head.transform = PredictionHead(config)

    def _encode(self, input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states, labels=None):
        """The backbone's output; padded where the loss reads padding positions, so that it is HF's loss."""
        reads_padding = False
        if labels is not None and attention_mask is not None and self.reads != "real":
            reads_padding = self.reads == "all" or bool(((labels != -100) & (attention_mask == 0)).any())
        return self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            unpad=False if reads_padding else None,
        )

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, cls_index) -> torch.Tensor:
        """(B, T, C) -> (B, C): the state at ``cls_index`` ("cls"), or the mean over real tokens ("mean")."""
        if self.config.classifier_pooling == "cls":
            return hidden[torch.arange(hidden.size(0), device=hidden.device), cls_index]
        if attention_mask is None:
            return hidden.mean(1)
        mask = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1)


class ModernBertForMaskedLM(_ModernBertHeadModel):
    """Masked language modelling: prediction head, then the token embedding matrix^T + bias: (B, T, V) logits."""

    task = "masked-lm"
    hf_architecture = "ModernBertForMaskedLM"
    head_key_map = KeyMap(MLM_FROM_HF)
    reads = "labelled"

    def __init__(self, config: ModernBertConfig):
        super().__init__(config)
        # tied, the weight is the token table (put in place by tie_weights): nothing of its own is allocated
        device = "meta" if config.tie_word_embeddings else None
        self.head.decoder = Linear(config.hidden_size, config.vocab_size, bias=False, device=device)
        if config.decoder_bias:
            self.head.decoder.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def get_output_embeddings(self) -> Linear:
        return self.head.decoder

    def resize_token_embeddings(self, new_num_tokens: int) -> nn.Embedding:
        """As the base class's; a tied decoder's bias follows the vocabulary too."""
        tokens = super().resize_token_embeddings(new_num_tokens)
        decoder = self.head.decoder
        if decoder.bias is not None and decoder.bias.numel() != new_num_tokens:
            decoder.bias = _resized_rows(decoder.bias, new_num_tokens)
        decoder.out_features = new_num_tokens
        return tokens

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        masked_only: bool = False,
        token_type_ids=None,  # ignored: no segment embeddings
    ) -> ModelOutput:
        """``labels``: (B, T) original ids at masked positions, -100 elsewhere. Returns logits (B, T, V).

        With labels and ``masked_only`` or ``config.sparse_prediction``, logits are (M, V): one row per position
        whose label is not ``sparse_pred_ignore_index``, in row-major order (cheap MLM training, as HF's option).
        """
        out = self._encode(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states, labels)
        hidden = out.last_hidden_state
        if masked_only and labels is None:
            raise ValueError("masked_only=True needs labels, which mark the masked positions")
        if labels is not None and (masked_only or self.config.sparse_prediction):
            scored = labels != self.config.sparse_pred_ignore_index
            hidden, labels = hidden[scored], labels[scored]  # (M, C), (M,)
        logits = self.head.decoder(self.head.transform(hidden))
        loss = token_loss(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class ModernBertForSequenceClassification(_ModernBertHeadModel):
    """Pooled state ("cls": position 0, or "mean") -> prediction head -> dropout -> linear: (B, L) logits."""

    task = "sequence-classification"
    hf_architecture = "ModernBertForSequenceClassification"
    head_key_map = KeyMap(CLASSIFIER_FROM_HF)

    multi_sample_dropout: int = 1  # dropout samples of the head per training forward (see multi_sample)

    def __init__(self, config: ModernBertConfig):
        super().__init__(config)
        self.head.dropout = nn.Dropout(config.classifier_dropout)
        self.head.classifier = Linear(config.hidden_size, config.num_labels)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        token_type_ids=None,  # ignored: no segment embeddings
    ) -> ModelOutput:
        """Returns logits (B, L). ``labels``: (B,) ids, (B,) floats (regression) or (B, L) multi-hot."""
        out = self._encode(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states)
        h = self.head.transform(self._pool(out.last_hidden_state, attention_mask, 0))  # (B, C)
        loss_of = None if labels is None else lambda logits: sequence_classification_loss(self.config, logits, labels)
        logits, loss = multi_sample(self, lambda: self.head.classifier(self.head.dropout(h)), loss_of)
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class ModernBertForTokenClassification(_ModernBertHeadModel):
    """Prediction head -> dropout -> linear on every token (NER, tagging): (B, T, L) logits."""

    task = "token-classification"
    hf_architecture = "ModernBertForTokenClassification"
    head_key_map = KeyMap(CLASSIFIER_FROM_HF)
    reads = "labelled"

    multi_sample_dropout: int = 1  # dropout samples of the head per training forward (see multi_sample)

    def __init__(self, config: ModernBertConfig):
        super().__init__(config)
        self.head.dropout = nn.Dropout(config.classifier_dropout)
        self.head.classifier = Linear(config.hidden_size, config.num_labels)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        token_type_ids=None,  # ignored: no segment embeddings
    ) -> ModelOutput:
        """Returns logits (B, T, L). ``labels``: (B, T) tag ids, -100 on positions not scored."""
        out = self._encode(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states, labels)
        h = self.head.transform(out.last_hidden_state)  # (B, T, C)
        loss_of = None if labels is None else lambda logits: token_loss(logits, labels)
        logits, loss = multi_sample(self, lambda: self.head.classifier(self.head.dropout(h)), loss_of)
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class ModernBertForQuestionAnswering(_ModernBertHeadModel):
    """Extractive QA: prediction head -> dropout -> a start and an end score for every token."""

    task = "question-answering"
    hf_architecture = "ModernBertForQuestionAnswering"
    head_key_map = KeyMap(CLASSIFIER_FROM_HF)
    reads = "all"

    def __init__(self, config: ModernBertConfig):
        super().__init__(config)
        self.head.dropout = nn.Dropout(config.classifier_dropout)
        self.head.classifier = Linear(config.hidden_size, 2)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        token_type_ids=None,  # ignored: no segment embeddings
    ) -> ModelOutput:
        """Returns ``start_logits`` and ``end_logits`` (B, T); loss when both positions (B,) are given."""
        labels = start_positions if end_positions is not None else None
        out = self._encode(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states, labels)
        logits = self.head.classifier(self.head.dropout(self.head.transform(out.last_hidden_state)))
        start_logits, end_logits = logits.unbind(-1)  # (B, T) each
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = span_loss(start_logits, end_logits, start_positions, end_positions)
        return ModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits, hidden_states=out.hidden_states)


class ModernBertForMultipleChoice(_ModernBertHeadModel):
    """Each (context, choice) pair is encoded and pooled ("cls": its first real token, or "mean"); prediction head
    -> dropout -> linear scores it: (B, N) logits."""

    task = "multiple-choice"
    hf_architecture = "ModernBertForMultipleChoice"
    head_key_map = KeyMap(CLASSIFIER_FROM_HF)

    multi_sample_dropout: int = 1  # dropout samples of the head per training forward (see multi_sample)

    def __init__(self, config: ModernBertConfig):
        super().__init__(config)
        self.head.dropout = nn.Dropout(config.classifier_dropout)
        self.head.classifier = Linear(config.hidden_size, 1)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        token_type_ids=None,  # ignored: no segment embeddings
    ) -> ModelOutput:
        """Inputs are (B, N, T) (embeddings (B, N, T, C)); returns logits (B, N); ``labels``: (B,) the right choice."""
        ref = input_ids if input_ids is not None else inputs_embeds
        B, N = ref.shape[:2]

        ids, mask, positions, embeds = flatten_choices(B, N, input_ids, attention_mask, position_ids, inputs_embeds)
        out = self._encode(ids, mask, positions, embeds, output_hidden_states)
        cls_index = 0 if mask is None else mask.argmax(-1)  # the first real token, left padding or right
        h = self.head.transform(self._pool(out.last_hidden_state, mask, cls_index))  # (B * N, C)
        loss_of = None if labels is None else lambda logits: F.cross_entropy(logits, labels.view(-1))
        logits, loss = multi_sample(self, lambda: self.head.classifier(self.head.dropout(h)).view(B, N), loss_of)
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


TASKS: dict[str, type[ModernBertPreTrainedModel]] = {
    cls.task: cls
    for cls in (
        ModernBertModel,
        ModernBertForMaskedLM,
        ModernBertForSequenceClassification,
        ModernBertForTokenClassification,
        ModernBertForQuestionAnswering,
        ModernBertForMultipleChoice,
    )
}
