"""The ``bunmyaku`` command. Each verb is a typed function whose docstring is its ``--help``."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Annotated

import typer

# Shown as a traceback only with --debug (or BUNMYAKU_DEBUG=1): everything else a user can cause and fix.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # also CheckpointError, DataError, UnicodeDecodeError, json.JSONDecodeError
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
_debug = False


def _user_error_types() -> tuple[type[BaseException], ...]:
    import yaml

    from bunmyaku.training.outputs import OutputDirBusy

    return (*USER_ERRORS, OutputDirBusy, yaml.YAMLError)


def _describe(error: BaseException, config: str | None) -> str:
    """One line for a user error, naming the file where the error has one (``config``: the --config recipe)."""
    import yaml

    if isinstance(error, yaml.YAMLError):
        text = " ".join(str(error).split())
        text = f"invalid YAML: {text.replace('<unicode string>', str(config))}" if config else f"invalid YAML: {text}"
        return text if config is None or str(config) in text else f"{config}: {text}"
    if isinstance(error, OSError) and error.filename and error.strerror and str(error).startswith("[Errno"):
        return f"{error.filename}: {error.strerror}"
    if isinstance(error, UnicodeDecodeError):
        return f"input is not UTF-8 text ({error}); convert it to UTF-8"
    return str(error) or type(error).__name__


@contextlib.contextmanager
def _user_errors(config: str | None = None) -> Iterator[None]:
    """End the command on a user error (bad file, option or data) with one red ``error:`` line on stderr and
    exit code 1; any other exception is a bug and keeps its traceback. ``--debug`` shows tracebacks for all."""
    try:
        yield
    except Exception as error:
        if _debug:
            raise
        if not isinstance(error, _user_error_types()):
            raise
        message = _describe(error, config)
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


def _check_output_dir(path: str) -> None:
    """Refuse an output folder that cannot be one before any work is done."""
    import os
    from pathlib import Path

    folder = Path(path)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise NotADirectoryError(f"--output-dir {path}: {existing} exists and is not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--output-dir {path}: {existing} is not writable")


def _reports_user_errors(command: Callable) -> Callable:
    @functools.wraps(command)
    def run(*args, **kwargs):
        with _user_errors(kwargs.get("config")):
            if kwargs.get("output_dir"):  # every verb that writes a folder: refused before any work
                _check_output_dir(kwargs["output_dir"])
            return command(*args, **kwargs)

    return run


class _Typer(typer.Typer):
    """A ``typer.Typer`` whose every command runs under :func:`_user_errors` (one handler for all verbs)."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)

        def decorator(function: Callable) -> Callable:
            register(_reports_user_errors(function))
            return function

        return decorator


app = _Typer(no_args_is_help=True, add_completion=False, help="bunmyaku: practical NLP with Transformers.")


def package_version() -> str:
    """The installed package's version (its metadata), else the source tree's ``bunmyaku.__version__``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bunmyaku")
    except PackageNotFoundError:  # run from a source tree that was never installed
        import bunmyaku

        return bunmyaku.__version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"bunmyaku {package_version()}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[
        bool, typer.Option("--debug", envvar="BUNMYAKU_DEBUG", help="Show the traceback of every error.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """bunmyaku: practical NLP with Transformers, from scratch on PyTorch."""
    global _debug
    _debug = debug


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


@app.command("train-tokenizer")
def train_tokenizer_command(
    files: Annotated[
        list[str] | None,
        typer.Argument(help="Training files or globs, relative to the current folder (to --data-dir when given)."),
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
    style: str = typer.Option(
        None,
        help="deberta: the DeBERTa-v2/v3 layout (with --kind unigram): [PAD] [CLS] [SEP] [UNK] at ids 0-3, [MASK] "
        "last, DebertaV2Tokenizer's text pipeline and template.",
    ),
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
    from bunmyaku.training.recipe import load_recipe

    _setup_logging(verbose)
    recipe = load_recipe(config) if config else {}
    if files and data_dir is None:  # files named on the command line are the user's, where the user stands
        files = [str(Path(f).absolute()) for f in files]
    flags = {
        "files": files or None,
        "kind": kind,
        "vocab_size": vocab_size,
        "pre_tokenizer": pre_tokenizer,
        "special_tokens": special_tokens or None,
        "min_frequency": min_frequency,
        "lowercase": lowercase,
        "style": style,
        "output_dir": output_dir,
    }
    settings = {**recipe, **{key: value for key, value in flags.items() if value is not None}}
    if not settings.get("files"):
        raise typer.BadParameter("give training files, or a --config recipe that lists them")
    if not settings.get("output_dir"):
        raise typer.BadParameter("give --output-dir (or output_dir in the recipe)")
    _check_output_dir(settings["output_dir"])
    root = resolve_data_dir(data_dir or settings.pop("data_dir", None), os.environ.get("BUNMYAKU_DATA"), Path.cwd())
    sources = resolve_training_files(settings.pop("files"), root)
    tokenizer = train_tokenizer(sources, show_progress=True, **settings)
    typer.echo(f"Trained {tokenizer!r}; saved to {settings['output_dir']}")


@app.command("convert")
def convert_command(
    file: Annotated[str, typer.Argument(help="The file to convert.")],
    from_format: str = typer.Option(..., "--from", help="The file's format: gguf (llama.cpp)."),
    output_dir: str = typer.Option(..., "--output-dir", help="The HF model folder to write (new or empty)."),
    dtype: str | None = typer.Option(None, help="Store the weights as float32 (default), bfloat16 or float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --output-dir."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logs."),
) -> None:
    """Convert a model file into a Hugging Face folder (config.json, model.safetensors, tokenizer with its chat
    template) that bunmyaku and transformers load. Quantized GGUF weights are dequantized."""
    from bunmyaku.models.convert import FORMATS, convert_gguf

    _setup_logging(verbose)
    if from_format not in FORMATS:
        raise ValueError(f"--from {from_format}: not a format bunmyaku converts; expected one of {list(FORMATS)}")
    convert_gguf(file, output_dir, dtype=dtype, overwrite=overwrite)
    typer.echo(f"Converted {file} to {output_dir}")


@app.command("merge-lora")
def merge_lora_command(
    adapter: Annotated[str, typer.Argument(help="A LoRA adapter folder (RUN/model of a finetune run with --lora-r).")],
    output_dir: str = typer.Option(..., "--output-dir", help="The merged HF model folder to write (new or empty)."),
    dtype: str | None = typer.Option(None, help="Store the weights as float32 (default), bfloat16 or float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --output-dir."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logs."),
) -> None:
    """Merge a LoRA adapter into its base model (adapter_config.json's base_model_name_or_path): one ordinary HF
    folder (config.json, model.safetensors, tokenizer, finetune.json) that transformers and bunmyaku load without
    peft."""
    from bunmyaku.models.lora import merge_adapter_dir

    _setup_logging(verbose)
    merge_adapter_dir(adapter, output_dir, dtype=dtype, overwrite=overwrite)
    typer.echo(f"Merged {adapter} into {output_dir}")


@app.command("longify")
def longify_command(
    model: str = typer.Option(..., "--model", help="A BERT or RoBERTa folder in HF layout (or a hub repo id)."),
    output_dir: str = typer.Option(..., "--output-dir", help="The Longformer folder to write (new or empty)."),
    max_length: int = typer.Option(4096, help="Tokens the long model takes (at least the source's)."),
    attention_window: str = typer.Option(
        "512", help="The two-sided window (even): one for every layer, or one per layer separated by commas."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --output-dir."),
    trained_length: int = typer.Option(
        None,
        help="The length the source was pretrained at, when shorter than its position table (e.g. 128 for a BERT "
        "with 512 positions trained on 128-token sequences): only those positions are copied.",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logs."),
) -> None:
    """Turn a BERT or RoBERTa into a Longformer (the Longformer paper's recipe): position embeddings copied to the
    new length, attention switched to a sliding window plus global tokens, global projections copied from the
    local ones. Continue with `bunmyaku pretrain --objective mlm --init-from OUTPUT_DIR`."""
    from bunmyaku.models.longify import longify

    _setup_logging(verbose)
    try:
        windows = [int(w) for w in attention_window.split(",")]
    except ValueError:
        message = f"--attention-window {attention_window}: expected an even int, or ints separated by commas"
        raise ValueError(message) from None
    window = windows[0] if len(windows) == 1 else windows
    longify(model, output_dir, max_length, window, overwrite=overwrite, trained_length=trained_length)
    typer.echo(f"Longified {model} into {output_dir} ({max_length} tokens, window {attention_window})")


# ------------------------------------------------------------------------------------------------- pretrain


def _pretrain(values: dict) -> None:
    from bunmyaku.training.args import PretrainArgs, TrainArgs
    from bunmyaku.training.distributed import process_group_from_env
    from bunmyaku.training.pretrain import run_pretraining
    from bunmyaku.training.recipe import build_args

    _setup_logging(values.pop("verbose"))
    with process_group_from_env():  # destroyed at the end, also on error (a live gloo group aborts at exit)
        pargs, targs = build_args((PretrainArgs, TrainArgs), values)
        run_pretraining(pargs, targs)


def _pretrain_command():
    from bunmyaku.training.args import PretrainArgs, TrainArgs
    from bunmyaku.training.recipe import typer_command

    command = typer_command((PretrainArgs, TrainArgs), _pretrain)
    command.__doc__ = (
        "Pretrain a model from raw text: --objective clm | mlm | mlm+nsp | rtd, a new model (--model-config) or "
        "--init-from a checkpoint, --tokenizer, --data files, --output-dir; or --config recipe.yaml with the "
        "same keys. Run under torchrun for data-parallel training."
    )
    return command


app.command("pretrain")(_pretrain_command())


# ------------------------------------------------------------------------------------------------- finetune


def _finetune(values: dict) -> None:
    from bunmyaku.tasks.finetune import OPTION_CLASSES, run_finetune
    from bunmyaku.training.distributed import is_main, process_group_from_env
    from bunmyaku.training.recipe import build_args

    _setup_logging(values.pop("verbose"))
    if not values.get("output_dir"):
        raise typer.BadParameter("give --output-dir (where the model, metrics and predictions go)")
    _check_output_dir(values["output_dir"])
    fargs, targs = build_args(OPTION_CLASSES, values)
    with process_group_from_env():  # under torchrun; destroyed at the end, also on error
        result = run_finetune(fargs, targs)
        shown = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float) and k != "train_seconds"}
        if is_main():  # one line, not one per process
            typer.echo(f"eval: {shown}; written to {targs.output_dir}")


def _finetune_command():
    from bunmyaku.tasks.finetune import OPTION_CLASSES
    from bunmyaku.training.recipe import typer_command

    command = typer_command(OPTION_CLASSES, _finetune)
    command.__doc__ = (
        "Fine-tune a model for a task: --task text-classification | sentence-similarity | token-classification | "
        "question-answering | multiple-choice | pair-classification, --model, --train, --eval (or --eval-split), "
        "the columns, --epochs, --output-dir; or --config recipe.yaml with the same keys. Writes metrics.json, "
        "predictions.jsonl, model/ (HF layout, model card), the log and loss curves. bunmyaku.finetune(...) is "
        "the same in Python."
    )
    return command


app.command("finetune")(_finetune_command())


def _cv(values: dict) -> None:
    from bunmyaku.tasks.cv import OPTION_CLASSES, run_cv
    from bunmyaku.training.distributed import is_main, process_group_from_env
    from bunmyaku.training.recipe import build_args

    _setup_logging(values.pop("verbose"))
    if not values.get("output_dir"):
        raise typer.BadParameter("give --output-dir (where the folds' runs and the out-of-fold results go)")
    _check_output_dir(values["output_dir"])
    cargs, fargs, targs = build_args(OPTION_CLASSES, values)
    with process_group_from_env():  # under torchrun; destroyed at the end, also on error
        result = run_cv(cargs, fargs, targs)
        shown = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}
        if is_main():  # one line, not one per process
            typer.echo(f"out of fold: {shown}; written to {targs.output_dir}")


def _cv_command():
    from bunmyaku.tasks.cv import OPTION_CLASSES
    from bunmyaku.training.recipe import typer_command

    command = typer_command(OPTION_CLASSES, _cv)
    command.__doc__ = (
        "K-fold fine-tuning with every finetune option, plus --folds, --fold-seed, --group-column and --seeds: "
        "writes oof.jsonl (one record per training example), metrics.json (out of fold), fold_metrics.json, "
        "fold{k}/ (each fold's finetune run) and, with --test, test_predictions.jsonl. A rerun resumes. "
        "bunmyaku.cv(...) is the same in Python."
    )
    return command


app.command("cv")(_cv_command())

_COLUMN_HELP = "Override the column the model was trained with."


@app.command("predict")
def predict_command(
    model: str = typer.Option(..., "--model", help="A fine-tuned model folder (DIR or DIR/model of a finetune run)."),
    input: str = typer.Option(..., "--input", help="Examples to predict (labels not needed)."),
    output: str = typer.Option(..., "--output", help="Where to write one JSON prediction per line."),
    batch_size: int = typer.Option(32, min=1, help="Rows per batch."),
    format: str = typer.Option(None, help="Input format (default: as at training, or from the suffix)."),
    text_column: str = typer.Option(None, help=_COLUMN_HELP),
    text_pair_column: str = typer.Option(None, help=_COLUMN_HELP),
    choice_columns: str = typer.Option(None, help=_COLUMN_HELP),
    long_strategy: str = typer.Option(None, help="truncate, head-tail or windows (default: as at training)."),
    stride: int = typer.Option(None, min=0, help="Tokens shared by consecutive windows (default: as at training)."),
    head_tokens: int = typer.Option(None, min=0, help="head-tail: tokens kept from the start (default: as trained)."),
    window_pooling: str = typer.Option(None, help="windows: mean, max or attention (default: as at training)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Predict with a fine-tuned model: one JSON line per input example (labels, scores, spans or answers)."""
    from bunmyaku.tasks.finetune import predict_file

    _setup_logging(verbose)
    overrides = {"format": format, "text_column": text_column, "text_pair_column": text_pair_column}
    overrides.update(long_strategy=long_strategy, stride=stride, head_tokens=head_tokens, window_pooling=window_pooling)
    n = predict_file(model, input, output, batch_size, choice_columns=choice_columns, **overrides)
    typer.echo(f"Wrote {n} predictions to {output}")


@app.command("evaluate")
def evaluate_command(
    model: str = typer.Option(..., "--model", help="A fine-tuned model folder (DIR or DIR/model of a finetune run)."),
    eval: str = typer.Option(..., "--eval", help="A labelled file."),
    output_dir: str = typer.Option(None, help="Also write metrics.json and predictions.jsonl here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace metrics.json / predictions.jsonl there."),
    batch_size: int = typer.Option(32, min=1, help="Rows per batch."),
    format: str = typer.Option(None, help="Input format (default: as at training, or from the suffix)."),
    text_column: str = typer.Option(None, help=_COLUMN_HELP),
    text_pair_column: str = typer.Option(None, help=_COLUMN_HELP),
    label_column: str = typer.Option(None, help=_COLUMN_HELP),
    choice_columns: str = typer.Option(None, help=_COLUMN_HELP),
    long_strategy: str = typer.Option(None, help="truncate, head-tail or windows (default: as at training)."),
    stride: int = typer.Option(None, min=0, help="Tokens shared by consecutive windows (default: as at training)."),
    head_tokens: int = typer.Option(None, min=0, help="head-tail: tokens kept from the start (default: as trained)."),
    window_pooling: str = typer.Option(None, help="windows: mean, max or attention (default: as at training)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Score a fine-tuned model on a labelled file with its task's metrics; prints them as JSON."""
    import json

    from bunmyaku.tasks.finetune import evaluate_file

    _setup_logging(verbose)
    overrides = {"format": format, "text_column": text_column, "text_pair_column": text_pair_column}
    overrides.update(label_column=label_column, choice_columns=choice_columns)
    overrides.update(long_strategy=long_strategy, stride=stride, head_tokens=head_tokens, window_pooling=window_pooling)
    metrics = evaluate_file(model, eval, output_dir, batch_size, overwrite=overwrite, **overrides)
    typer.echo(json.dumps(metrics, indent=2))


# ------------------------------------------------------------------------------------------------- pipelines
# One verb per pipeline: texts come as arguments (or one per line on stdin when none are given), results
# are printed as readable text, or as JSON with --json.

ModelOption = Annotated[
    str, typer.Option("--model", "-m", help="A model folder in HF layout, a finetune run folder, or a hub repo id.")
]
DeviceOption = Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: CUDA when available).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the results as JSON.")]
TextsArgument = Annotated[list[str] | None, typer.Argument(help="Texts; read one per line from stdin when none.")]


def _texts(texts: list[str] | None) -> list[str]:
    """The texts given, or the non-empty lines of stdin."""
    if texts:
        return texts
    import sys

    lines = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not lines:
        raise typer.BadParameter("give texts as arguments or on stdin")
    return lines


def _read_text(path: str, option: str) -> str:
    """The UTF-8 text of a file given by ``option``, with errors that name the option and the file."""
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{option} {path}: no such file" + (" (it is a folder)" if file.is_dir() else ""))
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{option} {path}: not UTF-8 text (byte {error.start}: {error.reason})") from None


def _print_json(data) -> None:
    import json

    typer.echo(json.dumps(data, ensure_ascii=False, indent=2))


@app.command("fill-mask")
def fill_mask_command(
    texts: TextsArgument = None,
    model: ModelOption = ...,
    top_k: int = typer.Option(5, help="Predictions per mask."),
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Predict the masked token(s) of each text (write the model's mask token, e.g. [MASK])."""
    from bunmyaku import pipeline

    texts = _texts(texts)
    results = pipeline("fill-mask", model=model, device=device, top_k=top_k)(texts)
    if as_json:
        return _print_json(results)
    for text, result in zip(texts, results, strict=True):
        typer.echo(text)
        for slot in result if result and isinstance(result[0], list) else [result]:
            typer.echo("  " + ", ".join(f"{p['token_str']} ({p['score']:.3f})" for p in slot))


@app.command("generate")
def generate_command(
    prompts: TextsArgument = None,
    model: ModelOption = ...,
    max_new_tokens: int = typer.Option(64, help="The most tokens to add."),
    do_sample: bool = typer.Option(False, "--do-sample/--greedy", help="Sample instead of taking the best token."),
    temperature: float = typer.Option(1.0, help="Sampling temperature."),
    top_k: int = typer.Option(0, help="Sample from the k most likely tokens (0: all)."),
    top_p: float = typer.Option(1.0, help="Sample from the smallest set with this much probability."),
    repetition_penalty: float = typer.Option(1.0, help="Penalise tokens already generated (>1)."),
    num_beams: int = typer.Option(1, help="Beam search with this many beams (1: greedy or sampling)."),
    seed: int | None = typer.Option(None, help="Random seed for sampling."),
    stop: Annotated[list[str] | None, typer.Option("--stop", help="A stop string (repeat the flag).")] = None,
    chat: bool = typer.Option(False, "--chat", help="Send each prompt as a user message through the chat template."),
    system: str | None = typer.Option(None, help="A system message for --chat."),
    stream: bool = typer.Option(False, "--stream", help="Print the text as it is generated (one prompt at a time)."),
    dtype: str | None = typer.Option(None, help="Model dtype: float32 (default), bfloat16, float16."),
    device: DeviceOption = None,
    as_json: JsonOption = False,
    tp: int = typer.Option(
        1, help="Tensor parallelism: split the model's heads over this many processes (launch with torchrun)."
    ),
) -> None:
    """Generate text with a decoder (GPT-2, Llama / SmolLM2; a HF folder or a GGUF file)."""
    import os

    from bunmyaku import pipeline
    from bunmyaku.training import sharding
    from bunmyaku.training.distributed import is_main, process_group_from_env

    prompts = _texts(prompts)
    with contextlib.ExitStack() as stack:
        if tp > 1:  # every process runs the whole generation (the split projections are collectives); rank 0 prints
            stack.enter_context(process_group_from_env())
            if device is None and _cuda_available():
                device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            seed = sharding.same_seed(seed)  # sampling: every process draws the same tokens
        pipe = pipeline("text-generation", model=model, device=device, dtype=dtype)
        if tp > 1:
            sharding.parallelize_for_inference(pipe.model, tp)
        echo = typer.echo if is_main() else _silent
        _generate(pipe, prompts, max_new_tokens, echo, do_sample=do_sample, temperature=temperature, top_k=top_k,
                  top_p=top_p, repetition_penalty=repetition_penalty, num_beams=num_beams, seed=seed, stop=stop,
                  chat=chat, system=system, stream=stream, as_json=as_json)  # fmt: skip


def _silent(*args, **kwargs) -> None:
    """typer.echo on the processes that do not print (tensor-parallel ranks other than 0)."""


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _generate(pipe, prompts, max_new_tokens, echo, *, do_sample, temperature, top_k, top_p, repetition_penalty,
              num_beams, seed, stop, chat, system, stream, as_json) -> None:  # fmt: skip
    inputs = [_chat_messages(p, system) if chat else p for p in prompts]
    settings = dict(do_sample=do_sample, seed=seed, num_beams=num_beams, repetition_penalty=repetition_penalty)
    # checked by generate() with or without sampling, so an out-of-range value is never silently ignored
    settings.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
    if stream and not as_json:
        for item in inputs:
            for piece in pipe.stream(item, max_new_tokens=max_new_tokens, **settings):
                echo(piece, nl=False)
            echo()
        return
    results = pipe(inputs, max_new_tokens=max_new_tokens, stop=stop, return_full_text=False, **settings)
    texts = [result[0]["generated_text"] for result in results]
    if as_json:
        if echo is typer.echo:
            _print_json([{"prompt": p, "generated_text": t} for p, t in zip(prompts, texts, strict=True)])
        return
    for prompt, text in zip(prompts, texts, strict=True):
        echo(text if chat else prompt + text)


def _chat_messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": prompt}]


@app.command("similarity")
def similarity_command(
    sentences: Annotated[list[str] | None, typer.Argument(help="Sentences (queries with --search).")] = None,
    model: ModelOption = ...,
    search: str | None = typer.Option(None, "--search", help="A corpus file, one entry a line, to search."),
    top_k: int = typer.Option(5, help="Hits per query with --search."),
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cosine similarity between sentences, or semantic search of a corpus file (--search) with a bi-encoder."""

    from bunmyaku import pipeline

    sentences = _texts(sentences)
    pipe = pipeline("sentence-similarity", model=model, device=device)
    if search:
        corpus = [line for line in _read_text(search, "--search").splitlines() if line.strip()]
        if not corpus:
            raise ValueError(f"--search {search}: the file has no entries (one per line)")
        hits = pipe.search(sentences, corpus, top_k=top_k)
        if as_json:
            return _print_json([{"query": q, "hits": h} for q, h in zip(sentences, hits, strict=True)])
        for query, found in zip(sentences, hits, strict=True):
            typer.echo(query)
            for hit in found:
                typer.echo(f"  {hit['score']:+.3f}  {hit['text']}")
        return
    matrix = pipe(sentences)
    if as_json:
        return _print_json({"sentences": sentences, "similarity": matrix})
    for i, (sentence, row) in enumerate(zip(sentences, matrix, strict=True)):
        typer.echo("  ".join(f"{v:+.3f}" for v in row) + f"   [{i}] {sentence}")


@app.command("classify")
def classify_command(
    texts: TextsArgument = None,
    model: ModelOption = ...,
    pair: str | None = typer.Option(None, help="A second text paired with every text (NLI, paraphrase)."),
    top_k: int = typer.Option(1, help="Labels per text, best first (0: all)."),
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Classify texts with a sequence-classification model (softmax, sigmoid for multi-label, raw for regression)."""
    from bunmyaku import pipeline

    texts = _texts(texts)
    pipe = pipeline("text-classification", model=model, device=device)
    results = pipe(texts, text_pair=None if pair is None else [pair] * len(texts), top_k=top_k or None)
    if as_json:
        return _print_json([{"text": t, "labels": r} for t, r in zip(texts, results, strict=True)])
    for text, result in zip(texts, results, strict=True):
        labels = ", ".join(f"{r['label']} ({r['score']:.3f})" for r in result)
        typer.echo(f"{labels}\t{text}")


@app.command("ner")
def ner_command(
    texts: TextsArgument = None,
    model: ModelOption = ...,
    aggregation: str = typer.Option("simple", help="simple | first | none."),
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Named entities (or any token tags) with character offsets, from a token-classification model."""
    from bunmyaku import pipeline

    texts = _texts(texts)
    results = pipeline("token-classification", model=model, device=device)(texts, aggregation=aggregation)
    if as_json:
        return _print_json([{"text": t, "entities": r} for t, r in zip(texts, results, strict=True)])
    for text, entities in zip(texts, results, strict=True):
        typer.echo(text)
        for e in entities:
            label = e.get("entity_group", e.get("entity"))
            typer.echo(f"  {label:<8} {text[e['start'] : e['end']]!r} [{e['start']}:{e['end']}] ({e['score']:.3f})")


@app.command("qa")
def qa_command(
    questions: Annotated[list[str], typer.Argument(help="Questions, all answered from the same context.")],
    model: ModelOption = ...,
    context: str | None = typer.Option(None, help="The context text."),
    context_file: str | None = typer.Option(None, help="A file holding the context text."),
    top_k: int = typer.Option(1, help="Answers per question."),
    max_answer_len: int = typer.Option(15, help="The longest answer, in tokens."),
    impossible: bool = typer.Option(False, "--impossible", help="Allow no answer (SQuAD 2.0 models)."),
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Extractive question answering: the span of the context that answers each question."""

    from bunmyaku import pipeline

    if (context is None) == (context_file is None):
        raise typer.BadParameter("give exactly one of --context and --context-file")
    text = context if context is not None else _read_text(context_file, "--context-file")
    pipe = pipeline("question-answering", model=model, device=device, handle_impossible_answer=impossible)
    results = pipe(questions, text, top_k=top_k, max_answer_len=max_answer_len)
    results = [r if isinstance(r, list) else [r] for r in results]
    if as_json:
        return _print_json([{"question": q, "answers": r} for q, r in zip(questions, results, strict=True)])
    for question, answers in zip(questions, results, strict=True):
        typer.echo(question)
        for a in answers:
            typer.echo(f"  {a['answer']!r} [{a['start']}:{a['end']}] ({a['score']:.3f})")


@app.command("translate")
def translate_command(
    texts: TextsArgument = None,
    model: ModelOption = ...,
    num_beams: int | None = typer.Option(None, help="Beams (default from generation_config.json, else 1)."),
    max_new_tokens: int | None = typer.Option(None, help="The most tokens per translation."),
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Translate texts with an encoder-decoder (MarianMT) model, greedy or with beam search."""
    from bunmyaku import pipeline

    texts = _texts(texts)
    settings = {k: v for k, v in dict(num_beams=num_beams, max_new_tokens=max_new_tokens).items() if v is not None}
    results = pipeline("translation", model=model, device=device)(texts, **settings)
    if as_json:
        return _print_json([{"text": t, **r} for t, r in zip(texts, results, strict=True)])
    for result in results:
        typer.echo(result["translation_text"])


# ------------------------------------------------------------------------------------------------- memory


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:,.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:,.1f} MiB"


@app.command("memory")
def memory_command(
    model: Annotated[str, typer.Option("--model", "-m", help="A model folder in HF layout, or its config.json.")],
    task: str = typer.Option(..., help="causal-lm | masked-lm | sequence-classification | token-classification."),
    batch_size: int = typer.Option(..., help="Sequences per device per micro-batch."),
    max_length: int = typer.Option(..., help="Tokens per sequence (full sequences are assumed)."),
    precision: str = typer.Option("fp32", help="fp32 | bf16 | fp16 (autocast over fp32 weights, as bunmyaku trains)."),
    strategy: str = typer.Option("ddp", help="ddp | fsdp (parameters, gradients, optimizer state sharded)."),
    world_size: int = typer.Option(1, help="Processes (devices) in the run."),
    tp: int = typer.Option(1, help="Tensor-parallel processes (--world-size counts them all, a multiple of --tp)."),
    grad_accum_steps: int = typer.Option(1, help="Micro-batches of --batch-size per optimizer step."),
    checkpointing: bool = typer.Option(False, "--checkpointing", help="Gradient checkpointing of every layer."),
    freeze_layers: int = typer.Option(0, help="Freeze layers 0..K-1."),
    lora_r: int = typer.Option(0, help="LoRA rank (0: no LoRA): adapters train, the base is frozen."),
    lora_targets: str | None = typer.Option(
        None, help="transformers module names to adapt (default: query,value / q_proj,v_proj / c_attn)."
    ),
    lora_quantize: str | None = typer.Option(
        None, help="QLoRA: the base's linear weights in nf4 or int8 (bitsandbytes); needs --lora-r."
    ),
    cpu_offload: bool = typer.Option(False, "--cpu-offload", help="FSDP keeps sharded state on the host."),
    num_labels: int | None = typer.Option(None, help="Classes of a classification head."),
    device_memory: str | None = typer.Option(
        None, help="Memory of one device (80GB, 24GiB): also print the largest batch size that fits."
    ),
    device: str = typer.Option("cuda", help="cuda | cpu: whose kernels (what attention and dropout keep)."),
    as_json: JsonOption = False,
) -> None:
    """Predict the peak memory per device of one training step: parameters, gradients and optimizer state
    (exact), activations (counted from what each layer saves for backward), buffers, and the peak.

    The total is the peak, not the sum: activations are freed while the backward pass writes gradients.
    Nothing is allocated; only config.json is read.
    """
    from rich.console import Console
    from rich.table import Table

    from bunmyaku.training.memory import largest_batch, parse_size, plan_memory

    settings = dict(
        model=model,
        task=task,
        max_length=max_length,
        precision=precision,
        strategy=strategy,
        world_size=world_size,
        tp=tp,
        grad_accum_steps=grad_accum_steps,
        checkpointing=checkpointing,
        freeze_layers=freeze_layers,
        lora_r=lora_r,
        lora_targets=lora_targets,
        lora_quantize=lora_quantize,
        cpu_offload=cpu_offload,
        num_labels=num_labels,
        device=device,
    )
    capacity = parse_size(device_memory) if device_memory is not None else None
    plan = plan_memory(batch_size=batch_size, **settings)
    fits = largest_batch(capacity, **settings) if capacity is not None else None
    if as_json:
        result: dict = plan.as_dict()
        if capacity is not None:
            result["largest_batch_size"] = fits
        return _print_json(result)
    title = f"{model}: {task}, batch {batch_size} x {max_length} tokens, {precision}, {strategy} x {world_size}"
    if tp > 1:
        title += f", tp {tp}"
    if grad_accum_steps > 1:
        title += f", {grad_accum_steps} micro-batches per step"
    table = Table(title=title)
    table.add_column("per device")
    table.add_column("bytes", justify="right")
    table.add_column("", justify="right")
    for name, value in plan.as_dict().items():
        table.add_row(name, f"{value:,}", _gib(value), style="bold" if name == "total" else None)
    console = Console()
    console.print(table)
    if capacity is not None:
        console.print(
            f"largest batch size that fits {device_memory}: {fits}" if fits else f"batch 1 does not fit {device_memory}"
        )


@app.command("attention")
def attention_command(
    text: Annotated[str, typer.Argument(help="The text whose attention to draw.")],
    model: ModelOption = ...,
    output_dir: Annotated[
        str, typer.Option("--output-dir", "-o", help="Folder for the PNGs (layer_00.png, ...).")
    ] = "attention_maps",
    max_length: int = typer.Option(64, help="The most tokens drawn (a longer text is truncated)."),
    device: DeviceOption = None,
) -> None:
    """Draw a text's attention weights as heat maps: one PNG per layer, one panel per head, tokens on both axes.

    Each row of a panel is a query token's soft look-up over the key tokens (it sums to 1).

    For encoder-only and decoder-only models (BERT, RoBERTa, GPT-2, Llama); needs matplotlib (the train extra).
    """
    from bunmyaku.pipelines.attention_maps import attention_maps

    _setup_logging(False)
    try:
        maps = attention_maps(model, text, output_dir, device=device, max_length=max_length)
    except ModuleNotFoundError as error:
        if "matplotlib" not in str(error):
            raise
        raise ValueError(str(error)) from None  # a one-line error naming the extra to install, not a traceback
    heads = maps.attentions[0].size(0)
    typer.echo(f"{len(maps.files)} layers x {heads} heads, {len(maps.tokens)} tokens -> {output_dir}")


@app.command("ensemble")
def ensemble_command(
    run_dirs: Annotated[list[str], typer.Argument(help="bunmyaku cv output folders (same training file and folds).")],
    method: str = typer.Option("mean", help="mean | weighted | rank | stacking."),
    meta: str | None = typer.Option(
        None, help="Stacking's second-stage model: logistic (on log-probabilities) | ridge (regression)."
    ),
    output_dir: str = typer.Option(
        ..., "--output-dir", help="Folder for oof.jsonl, metrics.json, fold_metrics.json, report.md."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logs."),
) -> None:
    """Combine k-fold runs into one ensemble, every reported score out of fold.

    mean averages the probabilities and rank the per-class ranks.

    Token classification and QA runs take mean only: their tag probabilities and candidate answers average as cv
    averages its seeds.

    weighted (non-negative weights summing to 1) and stacking (a scikit-learn model) are fitted on K-1 folds and
    scored on the held-out one.

    Writes OUT/oof.jsonl, OUT/metrics.json, OUT/fold_metrics.json, OUT/report.md and, when every run has them,
    OUT/test_predictions.jsonl (the formats of bunmyaku cv).
    """
    from bunmyaku.tasks.ensemble import ensemble

    _setup_logging(verbose)
    result = ensemble(run_dirs, output_dir, method=method, meta=meta)
    for name, values in result.run_metrics.items():
        typer.echo(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items() if v is not None))
    typer.echo(f"ensemble ({method}): " + ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if v is not None))
    mean, std = result.fold_metrics["mean"], result.fold_metrics["std"]
    typer.echo("per fold: " + ", ".join(f"{k} {v:.4f} ± {std[k]:.4f}" for k, v in mean.items() if v is not None))
    typer.echo(f"-> {output_dir}/report.md")
