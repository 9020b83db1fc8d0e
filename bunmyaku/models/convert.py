"""Convert a llama.cpp GGUF file into a Hugging Face model folder (``bunmyaku convert --from gguf``).

The folder holds ``config.json``, ``model.safetensors`` and the tokenizer (``tokenizer.json``,
``tokenizer_config.json`` with the chat template, ``special_tokens_map.json``), so that
``transformers.AutoModelForCausalLM.from_pretrained(folder)`` and ``AutoTokenizer`` load it. Quantized
weights are dequantized (GGUF's Q4 / Q8 blocks have no safetensors form); the folder is float32 unless
``dtype`` asks for less. It lives in models/ rather than hub/ because it builds the model and the tokenizer
(the hub layer knows neither): loading the file through the model also checks every tensor and config field.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from bunmyaku.hub.files import atomic_dir

logger = logging.getLogger(__name__)

FORMATS = ("gguf",)


def convert_gguf(
    gguf_file: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a GGUF file's model and tokenizer as a HF folder.

    The folder is written beside ``output_dir`` under a temporary name and renamed into place once complete,
    so a failed conversion leaves no half-written folder behind.

    Args:
        gguf_file: a Llama-family ``.gguf`` file (SmolLM2, Llama, ...).
        output_dir: the folder to create; it must not exist or be empty, unless ``overwrite``.
        dtype: store the weights in this dtype (``"bfloat16"``, ``"float16"``); default float32.
        overwrite: replace a non-empty ``output_dir`` (only once the new folder is complete).

    Returns:
        ``output_dir``.

    Raises:
        FileNotFoundError: no such file.
        FileExistsError: ``output_dir`` holds files and ``overwrite`` is False.
        ValueError: not a GGUF file, or one whose architecture or tokenizer bunmyaku cannot read.
    """
    from bunmyaku.models.llama import from_gguf
    from bunmyaku.tokenization import Tokenizer

    gguf_file, output_dir = Path(gguf_file), Path(output_dir)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist" + (" (it is a folder)" * gguf_file.is_dir()))
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        model = from_gguf(gguf_file)
        model.save_pretrained(tmp, dtype=dtype)
        del model
        Tokenizer.from_gguf(gguf_file).save_pretrained(tmp)
    logger.info("converted %s to %s", gguf_file, output_dir)
    return output_dir
