"""``python -m bunmyaku`` (and ``torchrun -m bunmyaku``) runs the command line."""

from bunmyaku.cli import app

app(prog_name="bunmyaku")
