"""The ``bunmyaku`` command. Each verb is a typed function whose docstring is its ``--help``."""

from __future__ import annotations

import logging

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="bunmyaku: practical NLP with Transformers.")


@app.callback()
def main() -> None:
    """bunmyaku: practical NLP with Transformers, from scratch on PyTorch."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def demo(
    device: str = typer.Option(None, help="cpu, cuda, ... (default: CUDA when available)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logs."),
) -> None:
    """Run the talk's three demos offline: Japanese fill-mask, text generation, sentence similarity."""
    from rich.console import Console

    from bunmyaku.demo import run_demos

    _setup_logging(verbose)
    console = Console()
    for i, result in enumerate(run_demos(device), start=1):
        console.rule(f"[bold]{i}. {result.title}")
        console.print(f"model: {result.model}")
        if result.skipped:
            console.print(f"[yellow]{result.skipped}")
            continue
        for row in result.rows:
            _print_row(console, row)
        console.print(f"[dim]({result.seconds:.1f} s)")


def _print_row(console, row: dict) -> None:
    if "sentence" in row:
        scores = "  ".join(f"{v:+.3f}" for k, v in row.items() if k != "sentence")
        console.print(f"  {scores}   {row['sentence']}")
    elif "query" in row:
        hits = "; ".join(f"{text} ({score:.3f})" for text, score in row["hits"])
        console.print(f"  search: {row['query']!r} -> {hits}")
    elif "predictions" in row:
        preds = ", ".join(f"{tok} ({score:.3f})" for tok, score in row["predictions"])
        console.print(f"  {row['text']} -> {preds}")
    elif "prompt" in row:
        console.print(f"  [bold]{row['label']}[/bold]\n  prompt: {row['prompt']!r}\n  output: {row['output']!r}")
    else:
        console.print(f"  {row}")
