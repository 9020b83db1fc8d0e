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
        self.records: list[dict[str, Any]] = []  # what the file holds, also in memory
        directory.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if _step(line) <= resume_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
            self.records = [json.loads(line) for line in kept if line.strip()]
        elif resume_step is None and self.path.is_file():
            self.path.unlink()
        self.tensorboard = _tensorboard(directory / "tensorboard")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (must hold ``step``); a non-finite number is written as null, never as bare NaN.

        (The Trainer stops on a non-finite loss before logging it; what remains is e.g. the infinite gradient
        norm of an fp16 step that the GradScaler skips.)
        """
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.records.append(record)
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


def plot_losses(metrics_path: Path, png_path: Path, title: str | None = None, metric: str | None = None) -> Path | None:
    """Plot the training loss (every logged step, the first included) and the evaluation loss against steps, and
    beside them the selection ``metric`` per evaluation; returns the PNG, or None without matplotlib.

    Args:
        metrics_path: the run's ``metrics.jsonl``.
        png_path: where to write the figure.
        title: the figure's title (run, model, task).
        metric: an evaluation value other than the loss to plot in a second panel (``eval_<metric>`` records).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'bunmyaku[train]'); no loss plot")
        return None
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    selected = [(r["step"], r[f"eval_{metric}"]) for r in records if metric and r.get(f"eval_{metric}") is not None]
    panels = 2 if metric else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for points, label in ((train, "train loss"), (evals, "eval loss")):
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=label, marker="o" if label.startswith("eval") else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if metric:
        ax = axes[0][1]
        if selected:
            steps, values = zip(*selected, strict=True)
            ax.plot(steps, values, marker="o", color="tab:green", label=f"eval {metric}")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
