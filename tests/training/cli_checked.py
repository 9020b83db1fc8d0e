"""``python -m bunmyaku ...`` that, at exit, fails with status 3 when a process group outlived the command (its gloo
threads still running: see tests/training/helpers.py): the tests start torchrun's commands through it."""

import atexit

from bunmyaku.cli import app
from tests.training.helpers import fail_if_group_outlived

atexit.register(fail_if_group_outlived)  # runs after the command has ended, through sys.exit or an error
app(prog_name="bunmyaku")
