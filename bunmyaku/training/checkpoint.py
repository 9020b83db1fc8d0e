"""Checkpoints: written atomically, rotated (keep the last k and the best), found again for exact resume.

A checkpoint is ``<output_dir>/checkpoints/step-00001000/`` holding the model in HF layout (``config.json``,
``model.safetensors``) and ``trainer_state.pt`` (optimizer, scheduler, scaler, plugin states, every process's
RNG states, the data position, the step). It is written under ``.tmp-step-...`` and renamed when complete, so
a run killed mid-save leaves the previous checkpoint intact and no half-written one that looks finished.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

STATE_NAME = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir(root: Path, step: int) -> Path:
    """The folder of the checkpoint at ``step``."""
    return root / f"step-{step:08d}"


def save_model(model: nn.Module, directory: Path, dtype: str | None = None) -> None:
    """HF layout for a bunmyaku model (``save_pretrained``, stored in ``dtype``), a plain state dict otherwise."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory, dtype=dtype)
    else:
        torch.save(model.state_dict(), directory / "model.pt")


def load_model(model: nn.Module, directory: Path) -> None:
    """Load weights written by :func:`save_model` into ``model`` in place."""
    if hasattr(model, "load_hf_state_dict"):
        from bunmyaku.hub import load_state_dict

        model.load_hf_state_dict(load_state_dict(directory), source=str(directory))
    else:
        model.load_state_dict(torch.load(directory / "model.pt", map_location="cpu"))


def save_checkpoint(root: Path, step: int, model: nn.Module, state: dict[str, Any]) -> Path:
    """Write the checkpoint for ``step`` atomically and return its folder."""
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, tmp)
    torch.save(state, tmp / STATE_NAME)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    logger.info("Saved checkpoint %s", final)
    return final


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first (temporary folders of an interrupted save are skipped)."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def rotate_checkpoints(root: Path, keep_last: int, keep: set[Path]) -> None:
    """Delete all but the last ``keep_last`` checkpoints and those in ``keep`` (the best); clear stale temporaries."""
    found = list_checkpoints(root)
    for _, path in found[: max(0, len(found) - keep_last)]:
        if path not in keep:
            shutil.rmtree(path)
    for path in root.glob(".tmp-step-*"):
        shutil.rmtree(path, ignore_errors=True)
