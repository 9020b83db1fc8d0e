"""The linear layer every model uses: ``nn.Linear`` with a faster CPU path for inference.

On x86 CPUs, PyTorch's ``F.linear`` goes to MKL's GEMM, which reads a large weight at well under the machine's
memory bandwidth when few rows multiply it: a decoding step (1 to 8 rows) is such a call for every weight of
the model, so generation on a CPU is bound by it. oneDNN's inner product (the kernel behind
``torch.ops.mkldnn._linear_pointwise``, which ``torch.compile`` uses for CPU inference) streams the same
weight about twice as fast at 1-8 rows and is still 5-15 % faster at thousands of rows (measured on a 2-core
AMD EPYC, fp32; BENCHMARKS.md). It has no autograd formula, so it serves only calls that need no gradient:
inference under ``torch.no_grad()`` / ``torch.inference_mode()``, or frozen weights on inputs without grad.
Everything else (training, CUDA, other dtypes, ``torch.compile`` graphs) is plain ``F.linear``.

The two kernels sum in different orders, so results differ by float32 rounding (~1e-6 relative), like
``F.linear`` on two machines. ``CPU_ONEDNN = False`` turns the path off (for A/B measurements).
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn

_ONEDNN_OP = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
# the gain was measured on x86 (AVX-512); on other CPUs oneDNN may be built on a different backend
CPU_ONEDNN = (
    _ONEDNN_OP is not None
    and torch.backends.mkldnn.is_available()
    and platform.machine().lower() in ("x86_64", "amd64")
)


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if not CPU_ONEDNN or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if needs_grad and torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling():
        return False  # let the compiler see (and fuse) a plain linear
    return type(weight) is torch.Tensor or type(weight) is nn.Parameter


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: (..., in) @ (out, in)^T + (out,) -> (..., out), on oneDNN where it pays."""
    if _onednn_applies(x, weight, bias):
        return _ONEDNN_OP(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state-dict keys and initialisation) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
