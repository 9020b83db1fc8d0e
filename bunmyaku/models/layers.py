"""Norms, feed-forward networks and the Transformer block shared by every architecture.

A block is attention then a feed-forward network, each wrapped in a residual connection and a
norm. Where the norm sits is the difference between the original Transformer / BERT and GPT-2 /
Llama::

    post-LN (Vaswani, BERT, Marian)          pre-LN (GPT-2, Llama)
    x = norm1(x + attn(x))                   x = x + attn(norm1(x))
    x = norm2(x + mlp(x))                    x = x + mlp(norm2(x))

Pre-LN trains stably without warm-up tricks at depth; post-LN is what the older checkpoints use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from bunmyaku.models.attention import Attention, KVCache
from bunmyaku.models.config import LayerConfig
from bunmyaku.models.fastpath import Packing
from bunmyaku.models.linear import Linear, linear_act


class _IntegerMaskDropout(torch.autograd.Function):
    """Dropout whose keep mask is drawn as 31-bit integers against a threshold, kept as bool for the backward.

    On CPU, ``F.dropout`` draws a float Bernoulli tensor, scales it and multiplies: drawing uniform integers (one
    Mersenne Twister word per element) and comparing is about twice as fast, and the saved mask is a quarter of the
    size. An element is kept with probability 1 - round(p 2^31) / 2^31, p to within 2^-31 (a float32 uniform draw
    resolves 2^-24).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_() >= round(p * 2**31)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x.mul(keep).mul_(ctx.scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``: each element zeroed with probability p, the others scaled by 1 / (1 - p).

    On CPU (floating point, eager) the mask is drawn as integers (:class:`_IntegerMaskDropout`), faster than
    ``F.dropout``'s; elsewhere, and for p = 1, it is ``F.dropout``. Either way it is seeded by ``torch.manual_seed``.

    Raises:
        ValueError: p outside [0, 1].
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0 or not x.is_cpu or not x.is_floating_point() or torch.compiler.is_compiling():
        return F.dropout(x, p, training=True)
    return _IntegerMaskDropout.apply(x, p)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments and repr) whose forward is :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_fast,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def activation(name: str):
    """The activation function for a HF ``hidden_act`` / ``activation_function`` name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / rms(x) * w, no mean, no bias. Computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one kernel instead of seven
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: LayerConfig) -> nn.Module:
    """LayerNorm or RMSNorm of width ``hidden_size``, as ``config.norm`` says."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class MLP(nn.Module):
    """Position-wise feed-forward: fc_out(act(fc_in(x))), width C -> intermediate_size -> C."""

    def __init__(self, config: LayerConfig):
        super().__init__()
        self.fc_in = Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.fc_out = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = activation(config.hidden_act)
        self.dropout = nn.Dropout(config.activation_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc_in = self.fc_in
        if type(fc_in) is Linear and not (fc_in._forward_hooks or fc_in._forward_pre_hooks):
            h = linear_act(x, fc_in.weight, fc_in.bias, self.act)  # act(fc_in(x)), fused where it pays
        else:  # a replaced or hooked projection runs as a module
            h = self.act(fc_in(x))
        return self.fc_out(self.dropout(h))


def lm_head(config) -> Linear:
    """The (V, C) vocabulary projection of a decoder, without bias. Tied (``tie_word_embeddings``), it is built on
    the meta device: the model's ``tie_weights`` puts the embedding matrix in its place, so no (V, C) weight of its
    own is allocated, not even for a moment."""
    device = "meta" if config.tie_word_embeddings else None
    return Linear(config.hidden_size, config.vocab_size, bias=False, device=device)


class SwiGLU(nn.Module):
    """Gated feed-forward (Shazeer 2020): fc_out(act(fc_gate(x)) * fc_in(x)), SiLU as the gate in Llama."""

    def __init__(self, config: LayerConfig):
        super().__init__()
        self.fc_gate = Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.fc_in = Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.fc_out = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_gate(x)) * self.fc_in(x))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Block(nn.Module):
    """One Transformer layer: self-attention, optional cross-attention, feed-forward.

    Args:
        config: the layer's config (built by each architecture's ``layer_config``).
        layer_idx: index of the layer (for the KV cache).
        cross_attention: add an encoder-decoder attention sub-layer after self-attention.
    """

    def __init__(self, config: LayerConfig, layer_idx: int, cross_attention: bool = False):
        super().__init__()
        self.pre_norm = config.pre_norm
        self.attn = Attention(config, layer_idx)
        self.attn_norm = make_norm(config)
        self.cross_attn = Attention(config, layer_idx, is_cross=True) if cross_attention else None
        self.cross_norm = make_norm(config) if cross_attention else None
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)
        self.mlp_norm = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)
        self.gradient_checkpointing = False

    def _sublayer(self, x: torch.Tensor, norm: nn.Module, fn) -> torch.Tensor:
        dropout = self.dropout if self.training and self.dropout.p > 0 else _identity
        if self.pre_norm:
            return x + dropout(fn(norm(x)))
        return norm(x + dropout(fn(x)))

    def _forward(self, x, mask, is_causal, rotary, cache, memory, memory_mask, packing, context):
        if context is not None and self.pre_norm:
            context = self.attn_norm(context)  # keys and values see what the queries see: normed inputs

        def attend(h):
            return self.attn(h, mask, is_causal, rotary, cache, packing=packing, context=context)

        x = self._sublayer(x, self.attn_norm, attend)
        if self.cross_attn is not None:
            x = self._sublayer(
                x, self.cross_norm, lambda h: self.cross_attn(h, memory_mask, cache=cache, memory=memory)
            )
        return self._sublayer(x, self.mlp_norm, self.mlp)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        packing: Packing | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C), or (N, C) -> (N, C) packed real tokens with ``packing``.

        ``memory``: (B, S, C) encoder states for cross-attention. ``context``: the layer's input at every
        position when ``x`` holds only the positions whose output is wanted (see :class:`Attention`).
        """
        args = (x, mask, is_causal, rotary, cache, memory, memory_mask, packing, context)
        if self.gradient_checkpointing and self.training and cache is None:
            # Recompute this layer's activations in the backward pass instead of storing them.
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)
