"""The ``bunmyaku`` command. Each verb is a typed function whose docstring is its ``--help``."""

from __future__ import annotations

import logging

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="bunmyaku: practical NLP with Transformers.")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
