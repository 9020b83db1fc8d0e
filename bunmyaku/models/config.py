"""The base of every model config: a dataclass that reads and writes HF ``config.json`` dicts.

Each architecture's config subclasses :class:`ModelConfig`, declares its fields with our shared
names (``hidden_size``, ``num_heads``, ``max_seq_len``, ``dropout`` ...) and maps them to HF's
names in ``HF_NAMES``. HF keys we do not model are kept in ``extra`` and written back unchanged,
so a config survives a round trip through bunmyaku.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

# Keys that HF writes as bookkeeping; we neither keep nor rewrite them.
_HF_BOOKKEEPING = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "output_past", "return_dict"}


@dataclass
class ModelConfig:
    """Fields common to every architecture; subclasses add their own."""

    model_type: ClassVar[str] = ""
    # our field name -> HF config.json key, where they differ
    HF_NAMES: ClassVar[dict[str, str]] = {}
    # fields that say how bunmyaku runs the model, not what it is: never written to config.json
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("attn_implementation", "gradient_checkpointing")

    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None  # regression | single_label_classification | multi_label_classification
    architectures: list[str] | None = None
    attn_implementation: str = "sdpa"  # sdpa | eager (the reference path, softmax(QK^T / sqrt(d)) V)
    gradient_checkpointing: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            if self.label2id is None:
                self.label2id = {v: k for k, v in self.id2label.items()}
        if self.label2id is not None:
            self.label2id = {str(k): int(v) for k, v in self.label2id.items()}
        if self.problem_type not in (None, "regression", "single_label_classification", "multi_label_classification"):
            raise ValueError(f"unknown problem_type {self.problem_type!r}")

    @property
    def num_labels(self) -> int:
        """Number of outputs of a classification head (HF's default is 2)."""
        return len(self.id2label) if self.id2label else 2

    def with_labels(self, labels: int | list[str]) -> ModelConfig:
        """A copy whose label maps hold ``labels`` (names, or a count for ``LABEL_i`` names)."""
        names = [f"LABEL_{i}" for i in range(labels)] if isinstance(labels, int) else list(labels)
        return dataclasses.replace(self, id2label=dict(enumerate(names)), label2id=None)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build a config from a HF ``config.json`` dict."""
        hf = dict(hf)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra" or not f.init:
                continue
            key = cls.HF_NAMES.get(f.name, f.name)
            if key in hf:
                kwargs[f.name] = hf.pop(key)
        if "num_labels" in hf and "id2label" not in kwargs:
            kwargs["id2label"] = {i: f"LABEL_{i}" for i in range(int(hf["num_labels"]))}
        hf.pop("num_labels", None)
        hf.pop("model_type", None)
        kwargs["extra"] = {k: v for k, v in hf.items() if k not in _HF_BOOKKEEPING}
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict for this config."""
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra" or f.name in self.RUNTIME_FIELDS:
                continue
            value = getattr(self, f.name)
            if value is None and f.name in ("id2label", "label2id", "problem_type", "architectures"):
                continue
            if f.name == "id2label":
                value = {str(k): v for k, v in value.items()}
            out[self.HF_NAMES.get(f.name, f.name)] = value
        out["model_type"] = self.model_type
        return out


@dataclass
class LayerConfig:
    """Everything one Transformer layer reads (:class:`~bunmyaku.models.layers.Block`, its attention and MLP).

    Each architecture's config builds it in ``layer_config``, so the architecture file shows what its blocks are:
    where the norm sits, which norm and feed-forward, biases, heads, dropouts.
    """

    hidden_size: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    pre_norm: bool  # True: x + f(norm(x)) (GPT-2, Llama); False: norm(x + f(x)) (Vaswani, BERT, Marian)
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "mlp"  # mlp: fc_out(act(fc_in(x))) | swiglu: fc_out(act(fc_gate(x)) * fc_in(x))
    mlp_bias: bool = True
    num_kv_heads: int | None = None  # None means num_heads; fewer is grouped-query attention
    head_dim: int | None = None  # None means hidden_size // num_heads
    attention_bias: bool = True  # on the q, k, v projections
    attention_out_bias: bool | None = None  # on the output projection; None means attention_bias
    attention_scale: float | None = None  # the factor on QK^T; None means 1 / sqrt(head_dim)
    dropout: float = 0.0  # on each sub-layer's output, before the residual sum
    attention_dropout: float = 0.0  # on the attention weights
    activation_dropout: float = 0.0  # inside the MLP, after the activation
    attn_implementation: str = "sdpa"  # sdpa | eager

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.attention_out_bias is None:
            self.attention_out_bias = self.attention_bias
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.mlp not in ("mlp", "swiglu"):
            raise ValueError(f"mlp must be 'mlp' or 'swiglu', got {self.mlp!r}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
