"""Checkpoints: written atomically, rotated (keep the last k and the best), found again for exact resume.

A checkpoint is ``<output_dir>/checkpoints/step-00001000/`` holding the model in HF layout (``config.json``,
``model.safetensors``) and the trainer's state (optimizer, scheduler, scaler, plugin states, every process's
RNG states, the data position, the step) in two files without pickle: ``trainer_state.json`` holds the
structure and the numbers, ``trainer_state.safetensors`` the tensors it refers to. Loading a checkpoint never
runs code. A checkpoint is written under ``.tmp-step-...`` and renamed when complete, so a run killed mid-save
leaves the previous checkpoint intact and no half-written one that looks finished; one damaged afterwards
(a cut file, a missing file, non-finite weights) is skipped with a warning in favour of the one before it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bunmyaku.hub.files import write_json_atomic

logger = logging.getLogger(__name__)

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"  # the pickled format of earlier releases: refused, never loaded
PLAIN_WEIGHTS = "model.safetensors"
STATE_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_MARKERS = frozenset({"__tensor__", "__tuple__", "__float__", "__items__"})


class LegacyCheckpointError(ValueError):
    """A checkpoint in the pickled format of earlier releases, which could run code when loaded."""


class UnreadableCheckpointError(ValueError):
    """A checkpoint folder that is incomplete, cut or holds non-finite weights."""


@dataclass
class Checkpoint:
    """A checkpoint read into memory and checked: its folder, model weights and trainer state."""

    path: Path
    step: int
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]


# ---------------------------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states, as tensors and plain numbers."""
    version, mt_state, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- trainer state


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """Write a nested state (dicts, lists, tuples, numbers, strings, None, tensors) as JSON + safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors)
    save_file(tensors, directory / STATE_TENSORS)
    write_json_atomic(directory / STATE_JSON, {"format": STATE_FORMAT, "state": tree}, sort_keys=False)


def read_state(directory: Path) -> dict[str, Any]:
    """Read :func:`write_state`'s files back, with the same types (tuples, int keys, CPU tensors)."""
    record = json.loads((directory / STATE_JSON).read_text(encoding="utf-8"))
    if not isinstance(record, dict) or record.get("format") != STATE_FORMAT:
        raise ValueError(f"{directory / STATE_JSON}: not a trainer state of format {STATE_FORMAT}")
    return _decode(record["state"], load_file(directory / STATE_TENSORS))


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for the structure; each tensor becomes ``{"__tensor__": name}`` and goes to ``tensors``."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}  # the best loss starts at inf
    if isinstance(obj, np.generic):
        return _encode(obj.item(), tensors)
    if torch.is_tensor(obj):
        name = str(len(tensors))
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": name}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not _MARKERS & obj.keys():
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}  # int keys
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (JSON and tensors only, no pickle)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------- model weights


def step_dir(root: Path, step: int) -> Path:
    """The folder of the checkpoint at ``step``."""
    return root / f"step-{step:08d}"


def save_model(model: nn.Module, directory: Path, dtype: str | None = None) -> None:
    """HF layout for a bunmyaku model (``save_pretrained``, stored in ``dtype``), safetensors otherwise."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory, dtype=dtype)
    else:
        from safetensors.torch import save_model as save_plain

        save_plain(model, str(directory / PLAIN_WEIGHTS))  # drops the aliases of tied weights


def read_weights(model: nn.Module, directory: Path) -> dict[str, torch.Tensor]:
    """The tensors :func:`save_model` wrote for ``model`` (HF names for a bunmyaku model), on the CPU."""
    if hasattr(model, "load_hf_state_dict"):
        from bunmyaku.hub import load_state_dict

        return load_state_dict(directory)
    return load_file(directory / PLAIN_WEIGHTS)


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Copy :func:`read_weights`' tensors into ``model`` in place."""
    if hasattr(model, "load_hf_state_dict"):
        model.load_hf_state_dict(weights, source=str(source))
        return
    missing, unexpected = model.load_state_dict(weights, strict=False)
    aliases = {name for name in missing if _is_alias(model, name, weights)}
    if unexpected or set(missing) - aliases:
        raise ValueError(f"{source}: weights do not match the model (missing {missing}, unexpected {unexpected})")


def _is_alias(model: nn.Module, name: str, weights: dict[str, torch.Tensor]) -> bool:
    """Whether parameter ``name`` shares its storage with one that was loaded (tied weights are stored once)."""
    state = model.state_dict(keep_vars=True)
    pointer = state[name].data_ptr()
    return any(state[other].data_ptr() == pointer for other in weights if other in state)


def load_model(model: nn.Module, directory: Path) -> None:
    """Load weights written by :func:`save_model` into ``model`` in place."""
    load_weights(model, read_weights(model, directory), directory)


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinity (one host sync for all of them)."""
    names = [n for n, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(tensors[n]).all().to(tensors[names[0]].device) for n in names]).tolist()
    return [n for n, ok in zip(names, finite, strict=True) if not ok]


# ---------------------------------------------------------------------------------------------- folders


def save_checkpoint(root: Path, step: int, model: nn.Module, state: dict[str, Any]) -> Path:
    """Write the checkpoint for ``step`` atomically and return its folder."""
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, tmp)
    write_state(tmp, state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    logger.info("Saved checkpoint %s", final)
    return final


def read_checkpoint(model: nn.Module, path: Path) -> Checkpoint:
    """Read and check the checkpoint in ``path`` without touching ``model``.

    Raises:
        LegacyCheckpointError: the folder holds only a pickled ``trainer_state.pt``.
        UnreadableCheckpointError: a file is missing or cut, or the weights are not finite.
    """
    if (path / LEGACY_STATE).exists() and not (path / STATE_JSON).exists():
        raise LegacyCheckpointError(
            f"{path} holds a checkpoint in the old pickled format ({LEGACY_STATE}), which bunmyaku no longer "
            "loads because unpickling a file can run code. Start afresh: remove that checkpoints folder, or "
            "choose another --output-dir (or pass --no-resume)"
        )
    match = _STEP_DIR.match(path.name)
    try:
        weights = read_weights(model, path)
        state = read_state(path)
    except Exception as error:  # any failure to read or parse the files: a cut or missing file
        raise UnreadableCheckpointError(f"{path} cannot be read ({type(error).__name__}: {error})") from error
    bad = non_finite(weights)
    if bad:
        raise UnreadableCheckpointError(f"{path} holds non-finite weights ({', '.join(bad[:5])})")
    return Checkpoint(path, int(match.group(1)) if match else state["step"], weights, state)


def latest_readable(model: nn.Module, root: Path) -> Checkpoint | None:
    """The newest checkpoint under ``root`` that reads back whole; a damaged newer one is skipped with a warning.

    Raises:
        LegacyCheckpointError: the newest checkpoint is in the old pickled format.
    """
    for _, path in reversed(_step_dirs(root)):
        try:
            return read_checkpoint(model, path)
        except UnreadableCheckpointError as error:
            logger.warning("Skipping a damaged checkpoint: %s; trying the one before it", error)
    return None


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first (temporary folders of an interrupted save are skipped)."""
    return [(step, path) for step, path in _step_dirs(root) if (path / STATE_JSON).is_file()]


def rotate_checkpoints(root: Path, keep_last: int, keep: set[Path]) -> None:
    """Delete all but the last ``keep_last`` checkpoints and those in ``keep`` (the best); clear stale temporaries."""
    found = list_checkpoints(root)
    for _, path in found[: max(0, len(found) - keep_last)]:
        if path not in keep:
            shutil.rmtree(path)
    for path in root.glob(".tmp-step-*"):
        shutil.rmtree(path, ignore_errors=True)
