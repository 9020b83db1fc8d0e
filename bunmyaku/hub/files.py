"""Reading and writing Hugging Face model folders.

A folder holds ``config.json`` and the weights in one of these forms, tried in this order:
``model.safetensors``; ``model.safetensors.index.json`` with its shards; ``pytorch_model.bin``;
``pytorch_model.bin.index.json`` with its shards. Pickled ``.bin`` files are only ever read with
``torch.load(weights_only=True)``, so a checkpoint cannot run code on load.

Every write goes to a temporary file in the destination folder and is renamed into place, so a
crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
CONFIG = "config.json"
RUN_MODEL_DIR = "model"  # where a ``bunmyaku finetune`` run folder keeps its model


class CheckpointError(ValueError):
    """A checkpoint that cannot be read into a model: missing files, bad JSON, wrong tensors."""


HUB_PREFIX = "hf://"
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.spm", "*.bin", "*.gguf"]


def is_repo_id(name: str) -> bool:
    """Whether ``name`` is a valid Hugging Face hub repo id (``"gpt2"``, ``"org/name"``), by the hub's own rules."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_path(
    path_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
    kind: str = "model",
) -> Path:
    """The one rule that turns a model or tokenizer argument into a local file or folder.

    - ``hf://org/name`` is a hub repo, always downloaded (or read from the hub cache);
    - a string that names an existing file or folder is local, and so is any ``os.PathLike`` (a ``Path``); a run
      folder of ``bunmyaku finetune`` (``runs/x``) stands for the model it holds (``runs/x/model``);
    - anything else is tried on the hub only if it is a valid repo id (``gpt2``, ``org/name``), and when
      that fails (offline, no such repo) the error names both readings: the local path it looked for, and
      the hub repo it could not reach.

    Args:
        path_or_repo_id: a local path, a hub repo id, or ``hf://`` and a repo id.
        revision: a branch, tag or commit for hub repos.
        allow_patterns: the files to download from a hub repo (default: a model folder's files).
        kind: what is being looked for ("model", "tokenizer"), for the error message.

    Raises:
        FileNotFoundError: neither a local file or folder nor a reachable hub repo.
        ValueError: ``hf://`` followed by something that is not a repo id.
    """
    name = os.fspath(path_or_repo_id)
    patterns = allow_patterns or MODEL_FILES
    if isinstance(name, str) and name.startswith(HUB_PREFIX):
        repo_id = name[len(HUB_PREFIX) :]
        if not is_repo_id(repo_id):
            raise ValueError(f"{name}: {repo_id!r} is not a valid hub repo id (expected name or org/name)")
        try:
            return _download(repo_id, revision, patterns)
        except Exception as e:
            raise FileNotFoundError(f"hub repo {repo_id} is not reachable ({_one_line(e)})") from e
    path = Path(name).expanduser()
    if path.exists():
        return model_in_run_folder(path)
    local = f"local {kind} path {path.resolve()} does not exist"
    if not isinstance(path_or_repo_id, str) or not is_repo_id(name):
        raise FileNotFoundError(local)
    try:
        found = _download(str(name), revision, patterns)
    except Exception as e:
        raise FileNotFoundError(
            f"{name} is neither a local folder nor a reachable hub repo id: {local}, and hub repo {name} is not "
            f"reachable ({_one_line(e)}); fix the path, or write {HUB_PREFIX}{name} when you mean the hub"
        ) from e
    logger.info("%s is not a local path: using hub repo %s (%s)", name, name, found)
    return found


def model_in_run_folder(path: Path) -> Path:
    """``path/model`` when ``path`` is a run folder (``runs/x`` of ``bunmyaku finetune``), else ``path``.

    A run folder holds results (metrics.json, predictions, logs) and its model in ``model/``; it has no
    ``config.json`` or tokenizer of its own, so that every verb can be given either ``runs/x`` or ``runs/x/model``.
    """
    inner = path / RUN_MODEL_DIR
    if path.is_dir() and not (path / CONFIG).exists() and not (path / "tokenizer.json").exists():
        if (inner / CONFIG).is_file() or (inner / "adapter_config.json").is_file():  # a model, or a LoRA adapter
            logger.info("%s is a run folder: using its model, %s", path, inner)
            return inner
    return path


def _one_line(error: Exception) -> str:
    """The hub client's multi-line messages, as one line."""
    return f"{type(error).__name__}: " + " ".join(str(error).split())


def _download(repo_id: str, revision: str | None, allow_patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    logger.info("fetching %s from the Hugging Face hub", repo_id)
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns))


def resolve_model_dir(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Path:
    """Return a local folder for a model: the folder itself, or a hub snapshot (see :func:`resolve_path`).

    Args:
        path_or_repo_id: a local folder in HF layout (or a finetune run folder holding one in ``model/``), a hub
            repo id such as ``"bert-base-uncased"``, or ``"hf://org/name"``.
        revision: a branch, tag or commit for hub repo ids.

    Raises:
        FileNotFoundError: the path does not exist locally and cannot be downloaded.
        NotADirectoryError: the path is a file.
    """
    path = resolve_path(path_or_repo_id, revision)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; expected a model folder holding config.json and the weights")
    return path


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``config.json`` from a model folder, with errors that name the file."""
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model folder needs a config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def checkpoint_keys(model_dir: str | os.PathLike) -> list[str]:
    """The tensor names of a HF model folder, read from the safetensors headers or the index (no tensor is
    loaded); a pickled ``.bin`` checkpoint has no header, so it is loaded."""
    model_dir = Path(model_dir)
    if (model_dir / SAFE_WEIGHTS).is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(model_dir / SAFE_WEIGHTS), framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{model_dir / SAFE_WEIGHTS}: not a readable safetensors file ({e})") from e
    for index in (SAFE_INDEX, BIN_INDEX):
        if (model_dir / index).is_file():
            try:
                return list(json.loads((model_dir / index).read_text(encoding="utf-8"))["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{model_dir / index}: expected a JSON object with a 'weight_map' field") from e
    return list(load_state_dict(model_dir))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types here: UnpicklingError, RuntimeError, EOFError
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def _load_sharded(index_path: Path, loader) -> dict[str, torch.Tensor]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map: dict[str, str] = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: expected a JSON object with a 'weight_map' field ({e})") from e
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{index_path} names shard {shard}, which is missing from {index_path.parent}")
        state.update(loader(shard_path))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(f"{index_path}: tensors listed in the index but absent from the shards: {missing}")
    return state


def load_state_dict(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every tensor of a HF model folder, whatever its weight format.

    Returns:
        The tensors by their HF names, on the CPU, in their stored dtype.
    """
    model_dir = Path(model_dir)
    if (model_dir / SAFE_WEIGHTS).is_file():
        return _load_safetensors(model_dir / SAFE_WEIGHTS)
    if (model_dir / SAFE_INDEX).is_file():
        return _load_sharded(model_dir / SAFE_INDEX, _load_safetensors)
    if (model_dir / BIN_WEIGHTS).is_file():
        return _load_bin(model_dir / BIN_WEIGHTS)
    if (model_dir / BIN_INDEX).is_file():
        return _load_sharded(model_dir / BIN_INDEX, _load_bin)
    raise FileNotFoundError(
        f"no weights in {model_dir}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}"
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600, and so do writers that replace the file (safetensors): give the usual mode, as open()
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it becomes ``path`` only if the block succeeds.

    A failure removes the temporary folder, so no half-written folder is left looking valid under ``path``.

    Args:
        path: the folder to create.
        overwrite: replace a non-empty ``path`` (it is removed only once the new folder is complete).

    Raises:
        FileExistsError: ``path`` exists, is not empty, and ``overwrite`` is False (checked before the block runs).
        NotADirectoryError: ``path`` exists and is a file.
    """
    import shutil

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is a file; expected a folder to write into")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; choose another folder or allow overwriting it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700: give the usual mode, as mkdir()
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` as UTF-8, atomically: readers see the old file or the whole new one, never a cut one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any, sort_keys: bool = True) -> None:
    """Write ``obj`` as indented JSON, atomically.

    Raises:
        ValueError: ``obj`` holds NaN or infinity (JSON has no such numbers; a run that produced one failed).
    """
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False)
    write_text_atomic(path, text + "\n")


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[Any]) -> None:
    """Write one JSON record per line, atomically (NaN and infinity refused as in :func:`write_json_atomic`)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")


def _shard_groups(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = tensor
        size += nbytes
    return groups


def save_state_dict(
    state: dict[str, torch.Tensor], model_dir: str | os.PathLike, max_shard_size: int | None = None
) -> list[Path]:
    """Save tensors as ``model.safetensors``, or as shards plus an index when over ``max_shard_size`` bytes.

    Tensors must not share memory (tied weights are dropped by the caller). Files left by an earlier
    save in another layout are removed, so the folder never holds two conflicting weight sets.

    Returns:
        The weight files written.
    """
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    metadata = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in state.values())
    groups = [state] if max_shard_size is None or total <= max_shard_size else _shard_groups(state, max_shard_size)
    written: list[Path] = []
    if len(groups) == 1:
        with atomic_path(model_dir / SAFE_WEIGHTS) as tmp:
            save_file(state, str(tmp), metadata=metadata)
        written.append(model_dir / SAFE_WEIGHTS)
        stale = [model_dir / SAFE_INDEX]
    else:
        weight_map = {}
        for i, group in enumerate(groups, start=1):
            name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            with atomic_path(model_dir / name) as tmp:
                save_file(group, str(tmp), metadata=metadata)
            weight_map.update(dict.fromkeys(group, name))
            written.append(model_dir / name)
        write_json_atomic(model_dir / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        stale = [model_dir / SAFE_WEIGHTS]
    stale += [model_dir / BIN_WEIGHTS, model_dir / BIN_INDEX]
    stale += [p for p in model_dir.glob("model-*-of-*.safetensors") if p not in written]
    for path in stale:
        if path.exists():
            path.unlink()
    return written
