"""Attention drawn as heat maps: for one text, each layer's weights softmax(QK^T / sqrt(D) + mask), head by head.

Attention is a soft dictionary look-up (the talk's opening): row t of a head's map says how much query token t
takes from each key token, and sums to 1. One PNG per layer, a grid with one panel per head, the tokens on both
axes (queries down, keys across). The weights come from ``output_attentions=True`` (the eager equation).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from bunmyaku.hub.files import atomic_path

logger = logging.getLogger(__name__)


@dataclass
class AttentionMaps:
    """What :func:`attention_maps` drew.

    Attributes:
        tokens: the T tokens of the text, as the tokenizer spells them (special tokens included).
        attentions: one (H, T, T) tensor of weights per layer.
        files: the PNG written for each layer, in layer order.
    """

    tokens: list[str]
    attentions: list[torch.Tensor]
    files: list[Path]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ModuleNotFoundError("drawing attention maps needs matplotlib: pip install 'bunmyaku[train]'") from error
    return plt


def draw_layer(weights: torch.Tensor, tokens: list[str], title: str):
    """One layer's (H, T, T) weights as a matplotlib figure: a grid of H heat maps, queries down, keys across.

    Args:
        weights: (H, T, T) attention weights, rows summing to 1.
        tokens: the T token strings, the labels of both axes.
        title: the figure's title.

    Returns:
        The figure; its first H axes are the heads' panels (a colour bar follows them).
    """
    plt = _pyplot()
    H, T, _ = weights.shape
    cols = min(H, 4)
    rows = math.ceil(H / cols)
    side = max(3.0, 0.22 * T + 1.5)  # inches per panel: room for T labels on both axes
    fig, axes = plt.subplots(
        rows, cols, figsize=(side * cols + 1.5, side * rows + 0.6), squeeze=False, layout="constrained"
    )
    image = None
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.remove()  # an empty slot of the last grid row
            continue
        image = ax.imshow(weights[h].float().cpu().numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks(range(T), tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(T), tokens, fontsize=7)
        ax.set_xlabel("key", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.colorbar(image, ax=list(axes.flat[:H]), shrink=0.8)
    return fig


def attention_maps(
    model: str | os.PathLike | torch.nn.Module,
    text: str,
    output_dir: str | os.PathLike,
    tokenizer=None,
    device: str | None = None,
    max_length: int = 64,
) -> AttentionMaps:
    """Write one heat-map grid per layer of ``model``'s attention weights over ``text`` (``layer_00.png``, ...).

    Args:
        model: a model folder (HF layout), a finetune run folder, a hub repo id, or a loaded bunmyaku model (then
            pass ``tokenizer``). Encoder-only (BERT, RoBERTa) and decoder-only (GPT-2, Llama) models.
        text: the text to look at.
        output_dir: where the PNGs go (created if needed).
        tokenizer: the tokenizer, when ``model`` is a loaded model; default the model folder's.
        device: where to run; default CUDA when available.
        max_length: the most tokens drawn; a longer text is truncated (and the truncation logged).

    Returns:
        The tokens, each layer's (H, T, T) weights and the files written.

    Raises:
        ValueError: an empty text, ``max_length`` < 2, or an encoder-decoder model.
        ModuleNotFoundError: matplotlib is not installed.
    """
    from bunmyaku.models import from_pretrained
    from bunmyaku.models.attention import attention_fields
    from bunmyaku.pipelines import default_device
    from bunmyaku.tokenization import Tokenizer

    if not isinstance(text, str) or not text.strip():
        raise ValueError("the text is empty: give the text whose attention to draw")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    _pyplot()  # fail before loading a model when matplotlib is missing
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("pass tokenizer= with a loaded model (or give the model's folder)")
        name = type(model).__name__
        device = str(next(model.parameters()).device) if device is None else device
    else:
        from bunmyaku.hub.files import resolve_path

        path = resolve_path(model)
        name = str(model)
        tokenizer = Tokenizer.from_pretrained(path) if tokenizer is None else tokenizer
        device = default_device(device)
        model = from_pretrained(path, task="base", device=device)
    if "attentions" not in attention_fields(model):
        raise ValueError(
            f"{name} is an encoder-decoder model; attention maps are drawn for encoder-only and decoder-only models "
            "(for its weights, call it with output_attentions=True)"
        )
    model = model.to(device).eval()
    full = tokenizer(text, return_tensors="pt")["input_ids"]
    if full.size(1) > max_length:
        logger.warning("the text has %d tokens; drawing the first %d (max_length)", full.size(1), max_length)
    batch = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
    accepted = inspect.signature(model.forward).parameters
    inputs = {k: v.to(device) for k, v in batch.items() if k in accepted and k != "labels"}
    with torch.inference_mode():
        out = model(**inputs, output_attentions=True)
    ids = batch["input_ids"][0].tolist()
    tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    attentions = [layer[0].float().cpu() for layer in out.attentions]  # (H, T, T) each
    return AttentionMaps(tokens, attentions, _write(attentions, tokens, Path(output_dir), name))


def _write(attentions: list[torch.Tensor], tokens: list[str], output_dir: Path, name: str) -> list[Path]:
    plt = _pyplot()
    output_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, weights in enumerate(attentions):
        fig = draw_layer(weights, tokens, f"{name}: layer {i} ({weights.size(0)} heads)")
        file = output_dir / f"layer_{i:02d}.png"
        try:
            with atomic_path(file) as tmp:
                fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        finally:
            plt.close(fig)
        files.append(file)
    logger.info("wrote %d attention maps (one per layer, one panel per head) to %s", len(files), output_dir)
    return files
