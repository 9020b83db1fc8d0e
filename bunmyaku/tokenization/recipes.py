"""Resolving the training files a tokenizer recipe lists (used by the CLI; the library takes plain paths)."""

from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Splits never used for training: evaluation data must stay unseen.
EXCLUDED_SPLITS = ("test",)


def resolve_data_dir(explicit: str | None, environment: str | None, project_root: Path) -> Path:
    """The data folder: `explicit`, else the `BUNMYAKU_DATA` value passed in, else `<root>/../shared/data`."""
    return Path(explicit or environment or project_root.parent / "shared" / "data")


def resolve_training_files(entries: list[str | dict[str, Any]], data_dir: Path) -> list[str | dict[str, Any]]:
    """Expand globs relative to `data_dir` and drop every `test` split.

    Args:
        entries: paths or globs, or `{"path": ..., "fields": [...]}` for structured files.
        data_dir: where relative paths resolve.

    Returns:
        Concrete paths (and dicts with concrete paths) for `train_tokenizer`.

    Raises:
        FileNotFoundError: when an entry matches no file.
    """
    resolved: list[str | dict[str, Any]] = []
    for entry in entries:
        pattern = entry["path"] if isinstance(entry, dict) else entry
        full = pattern if Path(pattern).is_absolute() else str(data_dir / pattern)
        matches = sorted(glob.glob(full))
        if not matches:
            raise FileNotFoundError(f"No training file matches {full} (data folder: {data_dir})")
        for match in matches:
            if Path(match).stem in EXCLUDED_SPLITS:
                logger.warning("Skipping %s: test splits are never used for training", match)
                continue
            resolved.append({**entry, "path": match} if isinstance(entry, dict) else match)
    return resolved
