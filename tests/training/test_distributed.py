"""Data parallelism: 2 gloo processes with micro-batches of B match 1 process with micro-batches of 2B, plain and with
each training plugin (FGM, AWP, SAM, ASAM, LLRD, EMA) on.

One launch of each (the single process and torchrun's two) trains every configuration one after the other: starting
the processes costs more than the tiny runs.
"""

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
from tests.training.run_tiny import PLUGINS

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


def _weights(run_dir, step=None):
    folder = run_dir if step is None else run_dir / "checkpoints" / f"step-{step:08d}"
    return load_file(folder / "model.safetensors")


def _assert_same(got, expected, what):
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=f"{what}: {name}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """6 steps of 2 micro-batches (checkpoints at 3 and 6) per configuration: OUT/<name>/ for each name in PLUGINS
    ("none" is the plain run), by 1 process with batches of 8 and by 2 with batches of 4."""
    out = tmp_path_factory.mktemp("ddp")
    flags = ["--save-every", "3", "--plugins", ",".join(PLUGINS)]
    single = _start([*SCRIPT, str(out / "single"), "6", "8", *flags])
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())]
    with open(out / "ddp.log", "w+b") as log:
        code = _wait(_start([*torchrun, *SCRIPT, str(out / "ddp"), "6", "4", *flags], log), 150)
        log.seek(0)
        stderr = log.read().decode(errors="replace")
    assert code == 0, stderr[-3000:]
    assert _wait(single, 150) == 0
    return out / "single", out / "ddp"


@pytest.mark.distributed
def test_two_process_gloo_run_matches_a_single_process(runs):
    single, ddp = runs
    _assert_same(_weights(ddp / "none"), _weights(single / "none"), "plain")


@pytest.mark.distributed
@pytest.mark.parametrize("plugin", [name for name in PLUGINS if name != "none"])
def test_plugins_under_ddp_match_a_single_process(runs, plugin):
    """The perturbations (FGM, AWP, SAM / ASAM) use the all-reduced gradient and their second pass is all-reduced
    again; LLRD's groups and the EMA / SWA averages are the same on every process: so after 3 steps (the checkpoint)
    and 6 (the exported model, the average for EMA and SWA) 2 processes with half the batch hold the weights of 1
    with the whole batch."""
    single, ddp = runs
    for step in (3, None):
        _assert_same(_weights(ddp / plugin, step), _weights(single / plugin, step), f"{plugin} at step {step or 6}")
    # the plugin changed the run (EMA and SWA only its export), by far more than the tolerance above
    with_plugin, plain = _weights(single / plugin), _weights(single / "none")
    assert max(float((with_plugin[k] - plain[k]).abs().max()) for k in plain) > 1e-3
    if plugin in ("ema", "swa"):  # the export is the average, not the last iterate
        last = _weights(ddp / plugin, 6)
        assert any(not torch.allclose(last[n], with_plugin[n], atol=1e-5) for n in last)


def test_cuda_runs_join_with_gloo_for_host_tensors(monkeypatch):
    """With CUDA, the default group reduces CUDA tensors over NCCL and CPU ones (FSDP's offloaded shards and their
    norms) over gloo; without CUDA, gloo."""
    from bunmyaku.training import distributed

    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", joined.append)
    devices = []
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    for cuda, expected in ((True, "cpu:gloo,cuda:nccl"), (False, "gloo")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert distributed.init_from_env()
        assert joined[-1] == expected
    assert devices == [1]  # the local device is set for NCCL only
