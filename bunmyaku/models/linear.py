"""The linear layer every model uses: ``nn.Linear`` with a faster CPU path.

On x86 CPUs, PyTorch's ``F.linear`` goes to MKL's GEMM, which reads a large weight at well under the machine's
memory bandwidth when few rows multiply it: a decoding step (1 to 8 rows) is such a call for every weight of
the model, so generation on a CPU is bound by it. oneDNN's inner product (the kernel behind
``torch.ops.mkldnn._linear_pointwise``, which ``torch.compile`` uses for CPU inference) streams the same
weight faster at few rows, and is faster at thousands of rows too (figures in BENCHMARKS.md, "Linears on oneDNN").

The kernel has no autograd formula. Calls that need no gradient (inference, frozen weights on inputs without
grad) call it directly; training goes through :class:`_OneDNNLinear`, whose backward runs on MKL's GEMM: the
input's gradient ``dY W`` and the weight's ``dY^T X``. (oneDNN computes ``dY W`` too, given the weight
transposed, but on a Zen 3 EPYC at 0.65-1.1x the GEMM's speed, 0.35-0.5x for a feed-forward block's second
projection; on DeBERTa-v3-base's fine-tuning step that cost a quarter of the step: BENCHMARKS.md, "Linears on
oneDNN".) Not on this path: CUDA, dtypes other than float32, CPU autocast (it must see ``F.linear`` to cast),
``torch.compile`` graphs (the compiler picks its own kernels) and double backward.

The two kernels sum in different orders, so results differ by float32 rounding (~1e-6 relative), like
``F.linear`` on two machines. The path is on where PyTorch runs its AVX-512 kernels (the CPUs it was measured
faster on); on AVX2-only CPUs oneDNN measured slower than GEMM and every call stays on ``F.linear``.
``CPU_ONEDNN`` (True or False) overrides the choice (for A/B measurements).

Batched decoding (a few rows per call) is faster still when the weight is first re-laid out into oneDNN's blocked
format for that row count (BENCHMARKS.md, "Generation"). Inside
:func:`packed_weights` (which ``generate`` enters for batches of 2 or more), inference calls with few rows pack each
weight on first use and reuse it; the packed copies are dropped when the block ends. They cost a second copy of the
weights while it lasts, so packing stops once they would take more than half of the memory that was available when
the block started; ``PACKED_DECODING = False`` turns packing off.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import platform
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

_ONEDNN_OP = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_REORDER_OP = getattr(getattr(torch.ops, "mkldnn", None), "_reorder_linear_weight", None)
# x86 only (on other CPUs oneDNN may be built on a different backend)
ONEDNN_AVAILABLE = (
    _ONEDNN_OP is not None
    and torch.backends.mkldnn.is_available()
    and platform.machine().lower() in ("x86_64", "amd64")
)
# and on by default only with AVX-512, where the gains were measured; on an AVX2-only Zen 3 EPYC oneDNN's product
# ran at 0.75-0.9x of GEMM's speed at every row count, decoding included, and DeBERTa-v3-base's fixed-length
# inference was 1.23x faster without it (BENCHMARKS.md, "Linears on oneDNN")
CPU_ONEDNN = ONEDNN_AVAILABLE and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


PACKED_DECODING = True  # see packed_weights


def _onednn(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, post_op: tuple[str, str] = ("none", "")
) -> torch.Tensor:
    """post_op(x W^T + b) on oneDNN's inner product; ``post_op`` is (oneDNN's name, its algorithm)."""
    return _ONEDNN_OP(x, weight, bias, post_op[0], [], post_op[1])


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not CPU_ONEDNN or not x.is_cpu or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    return type(weight) is torch.Tensor or type(weight) is nn.Parameter


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b on oneDNN, with its backward on GEMM: dX = dY W, dW = dY^T X, db = sum dY."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # a frozen weight needs no input for backward (as F.linear's own autograd: only dW reads x)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        flat = grad.reshape(-1, grad.size(-1))  # (rows, out)
        if ctx.needs_input_grad[0]:
            grad_x = (flat @ weight).view(*grad.shape[:-1], weight.size(1))  # (rows, out) @ (out, in)
        if ctx.needs_input_grad[1]:
            grad_weight = flat.t() @ x.reshape(-1, x.size(-1))  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat.sum(0)
        return grad_x, grad_weight, grad_bias


class _Packs:
    """Weights re-laid out for oneDNN at one row count, keyed by the weight's identity (see :func:`packed_weights`)."""

    def __init__(self, rows: int, budget: int):
        self.rows, self.budget = rows, budget
        self.packed: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}  # id -> (weight, version, packed)

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        entry = self.packed.get(id(weight))  # the entry holds its weight, so no other tensor can take this id
        version = 0 if weight.is_inference() else weight._version  # (inference tensors cannot be modified)
        if entry is not None and entry[1] == version:
            return entry[2]
        if entry is None:
            nbytes = weight.numel() * weight.element_size()
            if nbytes > self.budget:
                return weight  # over the memory budget: this one stays plain
            self.budget -= nbytes
        packed = _REORDER_OP(weight.detach(), self.rows)
        self.packed[id(weight)] = (weight, version, packed)  # holding the weight keeps its id unique
        return packed


_PACKS: contextvars.ContextVar[_Packs | None] = contextvars.ContextVar("bunmyaku_packs", default=None)


def _available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: no packing rather than a guess
        return 0


@contextlib.contextmanager
def packed_weights(rows: int) -> Iterator[None]:
    """Within this block, inference calls of at most ``rows`` rows read oneDNN-packed copies of their weights.

    Each weight is packed on its first such call (and again if it is modified in place); the copies are freed
    when the block ends. A no-op where the oneDNN path does not apply (CUDA, other dtypes: see the module notes).
    """
    if not (CPU_ONEDNN and PACKED_DECODING) or _REORDER_OP is None or _PACKS.get() is not None:
        yield
        return
    packs = _Packs(rows, _available_memory() // 2)
    token = _PACKS.set(packs)
    try:
        yield
    finally:
        _PACKS.reset(token)
        if packs.packed:
            mb = sum(p.numel() * p.element_size() for _, _, p in packs.packed.values()) / 2**20
            logger.debug("packed %d weights for %d rows (%.0f MB), now freed", len(packs.packed), rows, mb)


def _needs_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)


# activations that oneDNN can apply inside the product (a post-op), with the algorithm names it takes
_POST_OPS = {F.gelu: ("gelu", "none"), F.relu: ("relu", "")}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: (..., in) @ (out, in)^T + (out,) -> (..., out), on oneDNN where it pays."""
    return linear_act(x, weight, bias, None)


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act) -> torch.Tensor:
    """``act(linear(x, weight, bias))`` (``act=None``: none); in CPU inference, GELU (erf) and ReLU run inside
    oneDNN's product.

    That saves a pass over the (rows, out) activations, the widest tensor of a feed-forward block: worth it for
    thousands of rows (an encoder's batch), nothing for a decoding step.
    """
    if not _onednn_applies(x, weight):
        y = F.linear(x, weight, bias)
    elif torch.is_grad_enabled() and _needs_grad(x, weight, bias):
        y = _OneDNNLinear.apply(x, weight, bias)
    else:
        packs = _PACKS.get()
        if packs is not None and x.numel() <= packs.rows * x.size(-1):
            weight = packs.get(weight)
        post_op = ("none", "") if act is None else _POST_OPS.get(act)
        if post_op is not None:
            return _onednn(x, weight, bias, post_op)
        y = _onednn(x, weight, bias)
    return y if act is None else act(y)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state-dict keys and initialisation) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
