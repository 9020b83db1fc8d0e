"""The output-folder lock: one live run per folder; a dead run's lock file blocks nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from bunmyaku.training.outputs import LOCK_NAME, OutputDirBusy, exclusive_output_dir, is_locked

HOLD = """
import sys, time
from bunmyaku.training.outputs import exclusive_output_dir
with exclusive_output_dir(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def _holder(directory):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_is_refused_while_the_first_lives(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(OutputDirBusy, match=f"pid {proc.pid}"):
            with exclusive_output_dir(tmp_path):
                pass
        assert is_locked(tmp_path)
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_run_leaves_no_lock(tmp_path):
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the file stays; the lock died with the process
    deadline = time.monotonic() + 5
    while is_locked(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    with exclusive_output_dir(tmp_path) as held:
        assert held == tmp_path
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())


def test_same_process_cannot_take_it_twice(tmp_path):
    with exclusive_output_dir(tmp_path / "new" / "run") as held:
        assert held.is_dir()
        with pytest.raises(OutputDirBusy):
            with exclusive_output_dir(held):
                pass
    assert not is_locked(tmp_path / "new" / "run")


def test_a_file_is_not_an_output_folder(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(NotADirectoryError, match="taken"):
        with exclusive_output_dir(tmp_path / "taken"):
            pass
