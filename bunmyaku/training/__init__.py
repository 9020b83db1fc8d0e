"""Training: the Trainer and its TrainArgs, objectives, optimizer and schedule, plugins, checkpoints, DDP.

Names are re-exported lazily, so that reading ``TrainArgs`` (the CLI builds its flags from it) imports no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainArgs": "bunmyaku.training.args",
    "PretrainArgs": "bunmyaku.training.args",
    "FinetuneTrainArgs": "bunmyaku.training.args",
    "Trainer": "bunmyaku.training.trainer",
    "CausalLM": "bunmyaku.training.objectives",
    "MaskedLM": "bunmyaku.training.objectives",
    "MaskedLMWithNSP": "bunmyaku.training.objectives",
    "objective_for": "bunmyaku.training.objectives",
    "Plugin": "bunmyaku.training.plugins",
    "EMA": "bunmyaku.training.plugins",
    "Freeze": "bunmyaku.training.plugins",
    "SWA": "bunmyaku.training.plugins",
    "MultiSampleDropout": "bunmyaku.training.plugins",
    "FGM": "bunmyaku.training.adversarial",
    "AWP": "bunmyaku.training.adversarial",
    "SAM": "bunmyaku.training.adversarial",
    "run_pretraining": "bunmyaku.training.pretrain",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bunmyaku.training' has no attribute {name!r}")
