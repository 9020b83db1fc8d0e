"""Data parallelism: 2 gloo processes with micro-batches of B match 1 process with micro-batches of 2B."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT

SCRIPT = ["-m", "tests.training.run_tiny"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args: list[str], log=None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # a session of its own, so that a hung run is killed with every worker it started
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, start_new_session=True, stderr=log)


def _wait(process: subprocess.Popen, timeout: float) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise


@pytest.mark.distributed
@pytest.mark.parametrize("extra", [[], ["--swa-start", "0.2"]], ids=["plain", "swa"])
def test_two_process_gloo_run_matches_a_single_process(tmp_path, extra):
    # with SWA the exported weights are the average of the steps from epoch 0.2 on (steps 2 to 6 of ~7 per epoch)
    single = _start([*SCRIPT, str(tmp_path / "single"), "6", "8", "--save-every", "3", *extra])
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())]
    with open(tmp_path / "ddp.log", "w+b") as log:
        ddp = _start([*torchrun, *SCRIPT, str(tmp_path / "ddp"), "6", "4", "--save-every", "3", *extra], log)
        code = _wait(ddp, 90)
        log.seek(0)
        stderr = log.read().decode(errors="replace")
    assert code == 0, stderr[-3000:]
    assert _wait(single, 90) == 0
    expected = load_file(tmp_path / "single" / "model.safetensors")
    got = load_file(tmp_path / "ddp" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    last = load_file(tmp_path / "ddp" / "checkpoints" / "step-00000006" / "model.safetensors")  # the last iterate
    averaged = any(not torch.allclose(last[n], got[n], atol=1e-5) for n in got)
    assert averaged == bool(extra), "the export is the SWA average, not the last iterate"
