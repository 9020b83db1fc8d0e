"""bunmyaku (文脈, "context"): practical NLP with Transformers, from scratch on PyTorch.

The public entry points are re-exported here lazily, so ``import bunmyaku`` stays cheap:

- ``bunmyaku.from_pretrained(path_or_repo_id, task=..., dtype=..., device=...)``
- ``bunmyaku.Tokenizer`` and ``bunmyaku.train_tokenizer``
- ``bunmyaku.pipeline(task, model=..., device=...)``
- ``bunmyaku.finetune(task=..., model=..., train=..., ...)`` -> ``bunmyaku.FinetuneResult``
- ``bunmyaku.cv(folds=5, task=..., model=..., train=..., output_dir=...)`` -> ``bunmyaku.CvResult``
- ``bunmyaku.pretrain(objective=..., data=..., output_dir=..., ...)`` -> ``bunmyaku.PretrainResult``
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "from_pretrained": "bunmyaku.models.auto",
    "Tokenizer": "bunmyaku.tokenization",
    "train_tokenizer": "bunmyaku.tokenization",
    "pipeline": "bunmyaku.pipelines",
    "finetune": "bunmyaku.tasks.finetune",
    "FinetuneResult": "bunmyaku.tasks.finetune",
    "cv": "bunmyaku.tasks.cv",
    "CvResult": "bunmyaku.tasks.cv",
    "pretrain": "bunmyaku.training.pretrain",
    "PretrainResult": "bunmyaku.training.pretrain",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bunmyaku' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
