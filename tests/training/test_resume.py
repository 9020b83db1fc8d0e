"""Exact resume: a run killed at a random step (SIGKILL) and resumed ends with bit-identical weights."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bunmyaku.training.checkpoint import list_checkpoints
from tests.conftest import ROOT

STEPS = 14
KILL_SEED = 14  # a fixed draw: a failure names a kill step that the next run repeats


def _command(out: Path) -> list[str]:
    # dropout on: resume must restore the torch RNG too, not only weights and optimizer
    return [sys.executable, "-m", "tests.training.run_tiny", str(out), str(STEPS), "4", "--dropout", "0.1"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_killed_and_resumed_run_is_bit_identical(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    full = subprocess.Popen(_command(reference), cwd=ROOT, env=_env())
    kill_after = random.Random(KILL_SEED).randint(2, STEPS - 4)
    victim = subprocess.Popen(_command(killed), cwd=ROOT, env=_env())
    try:
        deadline = time.monotonic() + 120
        while not any(step >= kill_after for step, _ in list_checkpoints(killed / "checkpoints")):
            assert victim.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    assert not (killed / "model.safetensors").exists(), f"killed after step {kill_after} too late"
    subprocess.run(_command(killed), cwd=ROOT, env=_env(), check=True, timeout=120)
    assert full.wait(timeout=120) == 0

    expected, got = load_file(reference / "model.safetensors"), load_file(killed / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs after resuming from step >= {kill_after}"
    assert (reference / "metrics.jsonl").read_text().count("eval_loss") == (killed / "metrics.jsonl").read_text().count(
        "eval_loss"
    )
