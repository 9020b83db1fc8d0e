"""Frozen 4-bit and 8-bit base weights for QLoRA (Dettmers et al. 2023), on ``bitsandbytes``.

QLoRA is LoRA (:mod:`bunmyaku.models.lora`) on a base model whose linear weights are stored quantized: the
adapters and the new head train in float32 while the frozen weights they sit on take a quarter (int8) or an eighth
(nf4) of the memory. The quantized layers are ``bitsandbytes``' own, the same that ``transformers`` puts in a model
loaded with ``BitsAndBytesConfig`` and that ``peft`` wraps with its LoRA layers; bitsandbytes is maintained, and
since 0.45 it runs on the CPU as well as on CUDA, so the same run works on both.

Two schemes (:data:`SCHEMES`):

- ``nf4``: ``Linear4bit``, 4-bit NormalFloat in blocks of 64 weights, each block's absmax scale quantized again to
  8 bits in groups of 256 ("double quantization"): the QLoRA paper's recipe, and ``transformers``'
  ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``.
- ``int8``: ``Linear8bitLt`` (LLM.int8(), Dettmers et al. 2022): one absmax scale per output row, and input
  columns with values above 6.0 multiplied in 16 bits (``transformers``' default ``llm_int8_threshold``).

Which linears: every linear of the base model that the checkpoint stores (the attention and MLP projections), as
``transformers`` quantizes every linear but the output head. The embeddings, the norms, the new task head and a
language model's vocabulary projection (tied to the embeddings) stay in full precision. A quantized linear's
forward dequantizes its weight and runs the float product, so the model computes what the float model computes with
each weight replaced by its dequantized value; the rounding is the whole difference. (bitsandbytes' CPU inference
kernel, which repacks the weight on the first evaluation, is kept off: see :func:`_quantized_linear`.) The
quantization needs ``in_features`` to be a multiple of 64 for nf4, as every real checkpoint's widths are.

A run records its scheme in the adapter folder (``quantization_config`` in ``bunmyaku_config.json``, with
``transformers``' keys); :func:`~bunmyaku.models.lora.load_adapter` quantizes the base the same way, so a reloaded
run predicts as it did at its end. Merging (``bunmyaku merge-lora``) folds the adapters into the full-precision
base, as PEFT does for a model loaded unquantized. :func:`quantized_bytes` gives the bytes a quantized weight holds,
exactly (the memory planner's ``lora_quantize``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

SCHEMES = ("nf4", "int8")
NF4_BLOCK = 64  # weights per absmax scale
NF4_NESTED_BLOCK = 256  # scales per float32 scale of the double quantization
INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold, transformers' default


def _bnb() -> Any:
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(
            "lora_quantize needs the bitsandbytes package (4-bit and 8-bit layers, CPU and CUDA): "
            "pip install 'bunmyaku[qlora]'"
        ) from e
    return bitsandbytes


def check_scheme(scheme: str | None, lora_r: int = 1) -> None:
    """Refuse an unknown scheme, or a scheme without LoRA (a quantized base trains nothing on its own).

    Raises:
        ValueError: naming the setting and what it accepts.
    """
    if scheme is None:
        return
    if scheme not in SCHEMES:
        raise ValueError(f"lora_quantize {scheme!r}: expected one of {', '.join(SCHEMES)}")
    if not lora_r:
        raise ValueError("lora_quantize stores the frozen base of a LoRA run in 4 or 8 bits: give lora_r (e.g. 8) too")


def is_quantized(model: nn.Module) -> str | None:
    """The scheme :func:`quantize_base` applied to ``model``, None for a float model."""
    return getattr(model, "_quantized", None)


def quantize_base(model: nn.Module, scheme: str) -> nn.Module:
    """Replace the base model's linears by frozen ``bitsandbytes`` layers holding their weights in ``scheme``.

    Call it before :func:`~bunmyaku.models.lora.add_lora`, which then puts ``peft``'s LoRA layers for
    ``bitsandbytes`` on the targets. The biases stay float32 (frozen).

    Args:
        model: a bunmyaku model, in place; float32, on the device it will train on.
        scheme: ``"nf4"`` or ``"int8"``.

    Returns:
        ``model``.

    Raises:
        ValueError: an unknown scheme, a model already quantized, or weights that are not float32.
    """
    from bunmyaku.models.lora import base_linears

    check_scheme(scheme)
    if is_quantized(model):
        raise ValueError(f"this model is already quantized ({is_quantized(model)})")
    bnb = _bnb()
    count = before = after = 0
    for name in base_linears(model):
        linear = model.get_submodule(name)
        if linear.weight.dtype != torch.float32:
            raise ValueError(f"{name}: weights of dtype {linear.weight.dtype}; quantize a float32 model")
        layer = _quantized_linear(bnb, linear, scheme)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        count += 1
        before += linear.weight.numel() * linear.weight.element_size()
        after += quantized_bytes(tuple(linear.weight.shape), scheme)
    model._quantized = scheme
    logger.info(
        "Quantized %d linears to %s: their weights take %.1f MiB instead of %.1f MiB",
        count,
        scheme,
        after / 2**20,
        before / 2**20,
    )
    return model


def _quantized_linear(bnb: Any, linear: nn.Linear, scheme: str) -> nn.Module:
    """A ``bitsandbytes`` layer with ``linear``'s weight quantized (on its device) and its bias, all frozen."""
    out_features, in_features = linear.weight.shape
    bias = linear.bias is not None
    weight = linear.weight.detach().clone()
    if scheme == "nf4":
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=bias, compress_statistics=True, quant_type="nf4", device="meta"
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCK, compress_statistics=True, module=layer
        )
    else:
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=bias, has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta"
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    # bitsandbytes repacks a 4-bit weight in place for its CPU inference kernel on the first forward without grad
    # (on CPUs with AVX512-BF16), rounding the scales to bfloat16; training after such an evaluation then fails in
    # its autograd function, and the outputs would no longer be those of the dequantized weights. Kept off.
    layer.support_avx512bf16_for_cpu = False
    return layer.to(weight.device)  # quantizes the weight (bitsandbytes does it on the move to a device)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's bitsandbytes layers by name (:func:`quantize_base` made them; empty for a float model)."""
    if not is_quantized(model):
        return {}
    return {name: m for name, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")}


def frozen_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Prefixes of the ``state_dict`` keys held by quantized layers (weights, their statistics, biases): frozen, so a
    snapshot of what training changes (the Trainer's best evaluation) leaves them out. Empty for a float model."""
    return tuple(f"{name}." for name in quantized_layers(model))


def quantized_bytes(shape: tuple[int, ...], scheme: str) -> int:
    """Bytes one weight of ``shape`` holds once quantized with ``scheme``, exactly as ``bitsandbytes`` stores it.

    nf4: two weights per byte, one 8-bit scale per block of 64, one float32 scale per 256 of those, the two code
    tables (16 and 256 float32) and the float32 offset of the double quantization. int8: one byte per weight and one
    float32 scale per output row.
    """
    check_scheme(scheme)
    numel = math.prod(shape)
    if scheme == "int8":
        return numel + 4 * shape[0]
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 4 * (16 + 256 + 1)


def weight_bytes(layer: nn.Module) -> int:
    """Bytes a quantized layer's weight holds on its device: the packed weight and every quantization statistic."""
    weight = layer.weight
    tensors = [weight.data]
    state = getattr(weight, "quant_state", None)
    if state is not None:  # nf4: the scales, the code table, the nested scales and code, the offset
        tensors += [state.absmax, state.code]
        if state.nested:
            tensors += [state.offset, state.state2.absmax, state.state2.code]
    else:  # int8: the per-row scales (kept by the layer's state once it has run, on the weight before)
        scales = getattr(weight, "SCB", None)
        tensors.append(scales if scales is not None else layer.state.SCB)
    return sum(t.numel() * t.element_size() for t in tensors)


def quantization_config(scheme: str) -> dict[str, Any]:
    """``transformers``' ``quantization_config`` record for ``scheme`` (``BitsAndBytesConfig``'s keys)."""
    check_scheme(scheme)
    if scheme == "int8":
        return {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": INT8_THRESHOLD}
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "float32",
    }


def scheme_of(record: dict[str, Any] | None) -> str | None:
    """The scheme a ``quantization_config`` record (:func:`quantization_config`) names; None for no record.

    Raises:
        ValueError: a record this module did not write (another method, fp4, no double quantization).
    """
    if not record:
        return None
    for scheme in SCHEMES:
        if record == quantization_config(scheme):
            return scheme
    raise ValueError(
        f"quantization_config {record}: bunmyaku quantizes with bitsandbytes nf4 (double quantization) or int8"
    )
