"""The ``bunmyaku`` command. Each verb is a typed function whose docstring is its ``--help``."""

from __future__ import annotations

import logging

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="bunmyaku: practical NLP with Transformers.")


@app.callback()
def main() -> None:
    """bunmyaku: practical NLP with Transformers, from scratch on PyTorch."""


def _setup_logging(verbose: bool, quiet_level: int = logging.INFO) -> None:
    """Debug logs with ``--verbose``; otherwise ``quiet_level`` and up."""
    level = logging.DEBUG if verbose else quiet_level
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def demo(
    device: str = typer.Option(None, help="cpu, cuda, ... (default: CUDA when available)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logs."),
) -> None:
    """Run the talk's three demos offline: Japanese fill-mask, text generation, sentence similarity."""
    from rich.console import Console

    from bunmyaku.demo import run_demos

    _setup_logging(verbose, quiet_level=logging.WARNING)  # the demo's output is its printed results
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


from typing import Annotated  # noqa: E402  (appended with the train-tokenizer verb; typer reads the hints)


@app.command("train-tokenizer")
def train_tokenizer_command(
    files: Annotated[
        list[str] | None, typer.Argument(help="Training files or globs, relative to --data-dir unless absolute.")
    ] = None,
    config: str = typer.Option(None, "--config", help="A recipe YAML with the same keys as these flags."),
    kind: str = typer.Option(None, help="wordpiece | bpe | byte-bpe | unigram | character (default wordpiece)."),
    vocab_size: int = typer.Option(None, help="Vocabulary size, special tokens included (default 32000)."),
    pre_tokenizer: str = typer.Option(None, help="mecab | bert | whitespace | metaspace | byte-level."),
    special_tokens: Annotated[
        list[str] | None, typer.Option("--special-token", help="A reserved token (repeat the flag).")
    ] = None,
    min_frequency: int = typer.Option(None, help="Minimum count for a token to enter the vocabulary (default 2)."),
    lowercase: bool = typer.Option(None, "--lowercase/--no-lowercase", help="Lower-case the text."),
    output_dir: str = typer.Option(None, "--output-dir", help="Folder to write the trained tokenizer to."),
    data_dir: str = typer.Option(None, help="Where relative paths resolve: $BUNMYAKU_DATA, else ../shared/data."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Train a tokenizer (WordPiece, BPE, byte-level BPE, Unigram; MeCab for Japanese) and save a folder
    that both bunmyaku and transformers load."""
    import os
    from pathlib import Path

    from bunmyaku.tokenization import train_tokenizer
    from bunmyaku.tokenization.recipes import resolve_data_dir, resolve_training_files

    _setup_logging(verbose)
    recipe: dict = {}
    if config:
        import yaml

        with open(config, encoding="utf-8") as handle:
            recipe = yaml.safe_load(handle) or {}
    flags = {
        "files": files or None,
        "kind": kind,
        "vocab_size": vocab_size,
        "pre_tokenizer": pre_tokenizer,
        "special_tokens": special_tokens or None,
        "min_frequency": min_frequency,
        "lowercase": lowercase,
        "output_dir": output_dir,
    }
    settings = {**recipe, **{key: value for key, value in flags.items() if value is not None}}
    if not settings.get("files"):
        raise typer.BadParameter("give training files, or a --config recipe that lists them")
    if not settings.get("output_dir"):
        raise typer.BadParameter("give --output-dir (or output_dir in the recipe)")
    root = resolve_data_dir(data_dir or settings.pop("data_dir", None), os.environ.get("BUNMYAKU_DATA"), Path.cwd())
    sources = resolve_training_files(settings.pop("files"), root)
    tokenizer = train_tokenizer(sources, show_progress=True, **settings)
    typer.echo(f"Trained {tokenizer!r}; saved to {settings['output_dir']}")


# ------------------------------------------------------------------------------------------------- pretrain


def _pretrain(values: dict) -> None:
    from bunmyaku.training.args import PretrainArgs, TrainArgs
    from bunmyaku.training.distributed import init_from_env
    from bunmyaku.training.pretrain import run_pretraining
    from bunmyaku.training.recipe import build_args

    _setup_logging(values.pop("verbose"))
    init_from_env()
    pargs, targs = build_args((PretrainArgs, TrainArgs), values)
    run_pretraining(pargs, targs)


def _pretrain_command():
    from bunmyaku.training.args import PretrainArgs, TrainArgs
    from bunmyaku.training.recipe import typer_command

    command = typer_command((PretrainArgs, TrainArgs), _pretrain)
    command.__doc__ = (
        "Pretrain a model from raw text: --objective clm | mlm | mlm+nsp, a new model (--model-config) or "
        "--init-from a checkpoint, --tokenizer, --data files, --output-dir; or --config recipe.yaml with the "
        "same keys. Run under torchrun for data-parallel training."
    )
    return command


app.command("pretrain")(_pretrain_command())
