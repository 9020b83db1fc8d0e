"""Where metrics go: ``metrics.jsonl`` (one record per log or evaluation), TensorBoard when installed, a PNG."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from bunmyaku.hub.files import write_text_atomic

logger = logging.getLogger(__name__)


class MetricsWriter:
    """Appends records to ``<directory>/metrics.jsonl`` and mirrors scalars to TensorBoard when it is installed.

    Args:
        directory: the run's output folder.
        resume_step: drop records after this step (written by a run that was killed after its last checkpoint).
    """

    def __init__(self, directory: Path, resume_step: int | None = None):
        self.path = directory / "metrics.jsonl"
        directory.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if _step(line) <= resume_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.is_file():
            self.path.unlink()
        self.tensorboard = _tensorboard(directory / "tensorboard")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (must hold ``step``); a non-finite number is written as null, never as bare NaN.

        (The Trainer stops on a non-finite loss before logging it; what remains is e.g. the infinite gradient
        norm of an fp16 step that the GradScaler skips.)
        """
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.tensorboard is not None:
            self.tensorboard.close()


def _step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")  # a line cut by a kill: drop it


def _tensorboard(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(directory))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_losses(metrics_path: Path, png_path: Path) -> Path | None:
    """Plot training and evaluation loss against steps; returns the PNG, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'bunmyaku[train]'); no loss plot")
        return None
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label in ((train, "train"), (evals, "eval")):
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=label, marker="o" if label == "eval" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
