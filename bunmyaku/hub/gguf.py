"""Reading llama.cpp GGUF files into a HF-style config dict and HF-named float32 tensors.

A GGUF file holds metadata (``llama.block_count``, ``tokenizer.ggml.eos_token_id`` ...) and tensors named
the llama.cpp way (``blk.3.attn_q.weight``), often quantized (Q4_1, Q8_0 ...). :func:`read_gguf` returns
what a HF Llama checkpoint would hold: a ``config.json`` dict and tensors under HF names, dequantized to
float32. Building the model is the business of ``bunmyaku.models.llama.from_gguf``; this layer knows
nothing of modules.

Two differences from a HF checkpoint are undone here:

- llama.cpp stores each Q and K projection with the rows of every head reordered for its rotary kernel,
  which rotates adjacent channel pairs (2i, 2i + 1); HF rotates the pairs (i, i + D/2). See
  :func:`unpermute_rotary_rows`.
- A model with tied embeddings has no ``output.weight``; the config then says ``tie_word_embeddings``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

ARCHITECTURES = ("llama",)

# llama.cpp tensor name -> HF Llama name; {} is the layer index
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.bias": "model.layers.{}.self_attn.o_proj.bias",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install 'bunmyaku[gguf]'") from e
    return gguf


def hf_tensor_name(gguf_name: str) -> str:
    """The HF Llama name of a llama.cpp tensor. Raises ``KeyError`` for a tensor Llama has no use for."""
    m = _LAYER.match(gguf_name)
    if m is None:
        return GGUF_TO_HF[gguf_name]
    return GGUF_TO_HF["blk.{}." + m.group(2)].replace("{}", m.group(1))


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of a Q or K projection's rows (weight or bias), head by head.

    Within a head of D rows, HF's rotate-half layout pairs row i with row i + D/2; llama.cpp's converter
    interleaves the two halves so that the pair becomes rows (2i, 2i + 1). Reading the rows of each head
    as (D/2, 2) and transposing to (2, D/2) restores the halves.

    Args:
        weight: (num_heads * D, ...) as stored in the GGUF file.
        num_heads: heads of this projection (key/value heads for K).

    Returns:
        (num_heads * D, ...) in HF's row order.
    """
    D = weight.size(0) // num_heads
    rest = weight.shape[1:]
    w = weight.reshape(num_heads, D // 2, 2, *rest)  # (heads, D/2, 2, ...): row 2i + s of a head at [i, s]
    return w.transpose(1, 2).reshape(weight.shape)  # (heads, 2, D/2, ...) -> row s * D/2 + i


class _Metadata:
    """Typed access to a GGUF file's key-value metadata, with errors that name the file and the key."""

    def __init__(self, reader, path: Path):
        self.reader = reader
        self.path = path

    def __contains__(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        if key not in self:
            raise ValueError(f"{self.path}: GGUF metadata has no {key!r}, which a Llama model needs")
        return self.get(key)


def _hf_config(meta: _Metadata, arch: str, tensor_shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The HF ``config.json`` dict that the metadata describes."""
    hidden = int(meta.require(f"{arch}.embedding_length"))
    heads = int(meta.require(f"{arch}.attention.head_count"))
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": tensor_shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        "num_hidden_layers": int(meta.require(f"{arch}.block_count")),
        "intermediate_size": int(meta.require(f"{arch}.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(meta.require(f"{arch}.context_length")),
        "rms_norm_eps": float(meta.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": "blk.0.attn_q.bias" in tensor_shapes,
        "mlp_bias": False,
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
    }
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        # Passed on as HF writes it; the model config says which types it supports.
        config["rope_scaling"] = {"rope_type": scaling, "factor": float(meta.get(f"{arch}.rope.scaling.factor", 1.0))}
    if "rope_freqs.weight" in tensor_shapes:
        raise ValueError(
            f"{meta.path}: per-frequency RoPE factors (the 'rope_freqs' tensor of Llama 3.1 GGUF files) are not "
            "supported yet; load the model from a HF folder, whose config.json has rope_scaling"
        )
    for ours, key in [
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ]:
        value = meta.get(f"tokenizer.ggml.{key}")
        config[ours] = None if value is None else int(value)
    return config


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a Llama-family GGUF file as a HF checkpoint.

    Args:
        path: the ``.gguf`` file.

    Returns:
        The HF ``config.json`` dict, and the tensors under HF Llama names (``model.layers.0.self_attn.q_proj.weight``
        ...), dequantized to float32, Q and K rows in HF's rotate-half order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a GGUF file, an architecture other than Llama, missing metadata, or a tensor
            that has no HF Llama name.
        ImportError: the ``gguf`` package is not installed.
    """
    gguf = _import_gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e
    meta = _Metadata(reader, path)
    arch = meta.require("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: architecture {arch!r}; bunmyaku reads GGUF files of {list(ARCHITECTURES)}")
    # GGUF lists dimensions fastest-first; numpy (and torch) order is the reverse
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    config = _hf_config(meta, arch, shapes)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        try:
            name = hf_tensor_name(t.name)
        except KeyError:
            raise ValueError(f"{path}: tensor {t.name!r} has no place in a HF Llama model") from None
        array = gguf.quants.dequantize(t.data, t.tensor_type)
        array = np.require(array, np.float32, ["C", "W"])  # float32 tensors come back as read-only memory maps
        tensor = torch.from_numpy(array).reshape(shapes[t.name])
        kind = t.name.split(".")[-2]
        if kind in heads:
            tensor = unpermute_rotary_rows(tensor, heads[kind])
        state[name] = tensor
    return config, state
