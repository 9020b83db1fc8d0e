"""Fine-tuning, prediction and evaluation for every task family, on the Trainer.

``run_finetune`` reads the data (a held-out split of the training file when there is no eval file), fixes the
label set on the training data, loads the model with the task's head (or the same architecture randomly
initialised), encodes, and trains with the Trainer: one pre-formed, length-grouped batch per micro-batch,
evaluation every epoch with the task's metrics, early stopping after ``patience`` epochs without
improvement, and the best epoch's weights restored at the end. The output folder::

    DIR/metrics.json         final (best epoch) eval metrics with plain keys, and the test split's
    DIR/predictions.jsonl    one record per eval example
    DIR/model/               HF layout: config.json (id2label / label2id), weights, tokenizer, finetune.json
    DIR/metrics.jsonl        the training log (loss, lr, eval metrics per epoch); DIR/finetune.log; loss_curves.png

One run owns its output folder: it holds the folder's lock for the whole run, refuses a folder that already
holds anything unless ``overwrite`` (``--overwrite``), and then clears the earlier results before training,
so a run that fails never leaves an older run's metrics or model looking like its own. Every result file is
written through a temporary file and a rename; ``metrics.json`` comes last, so its presence means the run
finished.

``predict_file`` and ``evaluate_file`` load such a model folder again (``finetune.json`` says which task and
columns it was trained with).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn

from bunmyaku.data.loader import check_batch_size
from bunmyaku.data.tables import DataError
from bunmyaku.hub.files import write_json_atomic, write_jsonl_atomic
from bunmyaku.tasks.base import Feature, GroupCollator, GroupedBatches, Task, pad_id
from bunmyaku.tasks.choice import GPTPairClassification, MultipleChoice
from bunmyaku.tasks.classification import SentenceSimilarityCross, TextClassification
from bunmyaku.tasks.embedding import BiEncoder, SentenceEmbedding
from bunmyaku.tasks.ner import TokenClassification
from bunmyaku.tasks.qa import QuestionAnswering
from bunmyaku.training.args import TrainArgs, check_int, check_number
from bunmyaku.training.outputs import LOCK_NAME, exclusive_output_dir
from bunmyaku.training.plugins import Plugin

logger = logging.getLogger(__name__)

SETTINGS_NAME = "finetune.json"
TaskName = Literal[
    "text-classification",
    "sentence-similarity",
    "token-classification",
    "question-answering",
    "multiple-choice",
    "pair-classification",
]
TASK_NAMES: tuple[str, ...] = get_args(TaskName)
# TrainArgs defaults that suit fine-tuning better than pretraining's; flags and recipe keys override them
TRAIN_DEFAULTS = {"lr": 5e-5, "schedule": "linear", "min_lr_ratio": 0.0, "weight_decay": 0.01, "log_every": 20}
# what a run writes into its output folder (the Trainer's files move up from model/ at the end)
RESULTS = (
    "metrics.json",
    "predictions.jsonl",
    "model",
    "metrics.jsonl",
    "finetune.log",
    "loss_curves.png",
    "tensorboard",
    "checkpoints",
)
EVAL_RESULTS = ("metrics.json", "predictions.jsonl")


@dataclass
class FinetuneArgs:
    """What to fine-tune on what: the task, the model, the data files and columns, the task's options."""

    task: TaskName = "text-classification"
    """The task family."""
    model: str | None = None
    """A model folder in HF layout (or a hub repo id when online), loaded with the task's head."""
    tokenizer: str | None = None
    """A tokenizer folder (default: the model's)."""
    from_scratch: bool = False
    """Initialise the model's architecture randomly instead of loading its weights (a baseline)."""
    train: str | None = None
    """Training file: csv, tsv, jsonl, json, parquet; CoNLL or span JSON for tagging; SQuAD JSON for QA."""
    eval: str | None = None
    """Evaluation file (default: hold out eval_split of the training file)."""
    test: str | None = None
    """An optional test file, scored once with the best model (default: hold out test_split)."""
    eval_split: float = 0.0
    """Share of the training file held out for evaluation when there is no eval file (seeded; QA: by article)."""
    test_split: float = 0.0
    """Share of the training file held out as a test set (before eval_split is taken)."""
    format: Literal["auto", "csv", "tsv", "jsonl", "json", "parquet", "conll", "spans"] = "auto"
    """Input format (auto: from the suffix; tagging: conll or spans)."""
    header: bool | None = None
    """Whether a CSV / TSV has a header row (default: yes, unless the columns are given by position)."""
    text_column: str = "text"
    """The text column (a name, or a position such as 0 in a headerless TSV); the question for multiple choice."""
    text_pair_column: str | None = None
    """The second text of a pair (NLI, paraphrase, STS)."""
    label_column: str | None = "label"
    """The label column (tagging with spans: the entities field)."""
    choice_columns: str | None = None
    """Comma-separated choice columns for multiple choice and pair classification (choice0,choice1,...)."""
    problem_type: Literal["single-label", "multi-label", "regression"] | None = None
    """Classification kind (default: single-label; regression for sentence-similarity)."""
    label_separator: str = ","
    """Separates the labels of a multi-label example in a table cell."""
    encoder: Literal["cross", "bi"] = "cross"
    """sentence-similarity: a cross-encoder (both sentences in one input) or a bi-encoder (sentence embeddings)."""
    pooling: Literal["mean", "cls"] = "mean"
    """Bi-encoder pooling."""
    loss: Literal["contrastive", "cosine"] = "cosine"
    """Bi-encoder loss: in-batch contrastive (MultipleNegativesRanking) on pairs, or cosine regression on scores."""
    scale: float = 20.0
    """Bi-encoder contrastive loss: the temperature's inverse applied to cosines."""
    label_max: float = 1.0
    """Bi-encoder cosine loss: gold scores are divided by this (5 for STS-style 0-5 scores)."""
    tag_scheme: Literal["bio", "iob1"] = "bio"
    """CoNLL tag scheme (IOB1 is converted to BIO)."""
    label_all_tokens: bool = False
    """Tagging: train on every sub-token, not only on the first of each word."""
    max_length: int = 256
    """Tokens per input (per window for QA), special tokens included."""
    stride: int = 128
    """QA: tokens shared by consecutive windows of a long context."""
    max_answer_length: int = 30
    """QA: the longest answer, in tokens."""
    n_best: int = 20
    """QA: top starts and ends paired up in each window."""
    null_threshold: float = 0.0
    """QA (SQuAD 2.0): a span must beat the no-answer score by more than this."""
    lm_weight: float = 0.0
    """pair-classification: weight of GPT-1's auxiliary language-modelling loss (0.5 in the paper)."""
    epochs: float = 3.0
    """Passes over the training data."""
    warmup_ratio: float = 0.1
    """Share of the steps spent warming up the learning rate (replaces warmup_steps; 0: use warmup_steps)."""
    eval_batch_size: int = 0
    """Rows per evaluation batch (0: batch_size)."""
    patience: int = 0
    """Stop after this many evaluations without improvement of the metric (0: never stop early)."""
    metric: str | None = None
    """The eval metric that picks the best epoch (default: the task's: accuracy, f1, spearman)."""
    overwrite: bool = False
    """Replace the results of an earlier run in the output folder (they are cleared before training starts)."""

    def __post_init__(self) -> None:
        if self.task not in TASK_NAMES:
            raise ValueError(f"unknown task {self.task!r}; expected one of {list(TASK_NAMES)}")
        for name in ("eval_split", "test_split"):
            check_number(name, getattr(self, name), low=0.0, high=1.0, high_open=True)
        check_number("epochs", self.epochs, low=0.0, low_open=True)
        check_number("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        check_number("scale", self.scale, low=0.0, low_open=True)
        check_number("label_max", self.label_max, low=0.0, low_open=True)
        check_number("lm_weight", self.lm_weight, low=0.0)
        check_number("null_threshold", self.null_threshold)
        check_int("max_length", self.max_length, low=8)
        for name in ("max_answer_length", "n_best"):
            check_int(name, getattr(self, name), low=1)
        for name in ("stride", "eval_batch_size", "patience"):
            check_int(name, getattr(self, name), low=0)
        if isinstance(self.choice_columns, list):
            self.choice_columns = ",".join(self.choice_columns)
        for name in ("text_column", "text_pair_column", "label_column"):
            value = getattr(self, name)
            if isinstance(value, int):  # a position written as a number in YAML
                setattr(self, name, str(value))


def build_task(settings: FinetuneArgs) -> Task:
    """The task object for ``settings.task`` (and ``encoder`` for sentence similarity)."""
    if settings.task == "sentence-similarity":
        return SentenceEmbedding(settings) if settings.encoder == "bi" else SentenceSimilarityCross(settings)
    classes = {
        "text-classification": TextClassification,
        "token-classification": TokenClassification,
        "question-answering": QuestionAnswering,
        "multiple-choice": MultipleChoice,
        "pair-classification": GPTPairClassification,
    }
    return classes[settings.task](settings)


# ------------------------------------------------------------------------------------------------
# The Trainer's side: objective and per-epoch evaluation


class TaskObjective:
    """The task's loss as the Trainer wants it (a sum and a count); in eval mode it also keeps the outputs."""

    def __init__(self, task: Task):
        self.task = task
        self.outputs: dict[int, torch.Tensor] = {}

    def count(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """Units the loss averages over."""
        return {"task": self.task.count(batch)}

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        loss, outputs = self.task.forward(model, batch)
        if not model.training:
            for index, row in zip(batch["index"].tolist(), outputs.cpu(), strict=True):
                self.outputs[index] = row
        return {"task": loss * self.task.count(batch)}, {}

    def take(self, n: int) -> list[torch.Tensor]:
        """The kept outputs in feature order, then forget them."""
        outputs = [self.outputs[i] for i in range(n)]
        self.outputs = {}
        return outputs


class TaskEvaluation(Plugin):
    """After each evaluation: the task's metrics (added to the log as ``eval_<name>``), the best weights kept
    in memory, early stopping after ``patience`` evaluations without improvement.

    Early stopping ends the Trainer's loop by lowering ``trainer.args.max_steps`` to the current step. A metric
    that is undefined in an evaluation (None, e.g. the correlation of constant predictions) is no improvement;
    one that is not finite stops the run.
    """

    def __init__(
        self,
        task: Task,
        objective: TaskObjective,
        examples: list[dict[str, Any]],
        features: list[Feature],
        metric: str,
        patience: int,
        steps_per_epoch: int,
    ):
        self.task, self.objective = task, objective
        self.examples, self.features = examples, features
        self.metric, self.patience, self.steps_per_epoch = metric, patience, steps_per_epoch
        self.best_score = -math.inf
        self.best: dict[str, Any] = {}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_outputs: list[torch.Tensor] = []
        self.bad_evals = 0
        self.history: list[dict[str, float]] = []

    def on_evaluate(self, trainer, metrics: dict[str, float]) -> None:
        outputs = self.objective.take(len(self.features))
        scores = {"loss": metrics["eval_loss"], **self.task.metrics(self.examples, self.features, outputs)}
        epoch = trainer.step / self.steps_per_epoch
        if self.metric not in scores:
            raise ValueError(f"metric {self.metric!r} is not computed for this task; available: {sorted(scores)}")
        broken = sorted(k for k, v in scores.items() if isinstance(v, float) and not math.isfinite(v))
        if broken:
            raise ValueError(
                f"eval {', '.join(broken)} not finite at epoch {epoch:.2f}: the model's outputs are broken"
            )
        metrics.update({f"eval_{k}": v for k, v in scores.items() if k != "loss" and v is not None})
        self.history.append({"epoch": epoch, **scores})
        value = scores[self.metric]
        score = -math.inf if value is None else -value if self.metric == "loss" else value
        if self.best_state is None or score > self.best_score:
            self.best_score, self.bad_evals = score, 0
            self.best = {**scores, "epoch": epoch, "step": trainer.step}
            state = trainer.unwrapped_model.state_dict()
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
            self.best_outputs = outputs
        else:
            self.bad_evals += 1
        logger.info(
            "epoch %.2f: %s %s (best %s at epoch %.2f)",
            epoch,
            self.metric,
            show(value),
            show(self.best[self.metric]),
            self.best["epoch"],
        )
        if self.patience and self.bad_evals >= self.patience and trainer.step < trainer.args.max_steps:
            logger.info("Early stopping: no improvement in %d evaluations", self.bad_evals)
            trainer.args.max_steps = trainer.step


def show(value: float | None) -> str:
    """A metric for a log line ("undefined" for None)."""
    return "undefined" if value is None else f"{value:.4f}"


# ------------------------------------------------------------------------------------------------
# Running


def split_examples(
    examples: list[dict[str, Any]], groups: list[Any], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hold out ``fraction`` of the groups (seeded); returns (kept, held out), each in file order."""
    unique = list(dict.fromkeys(groups))
    rng = np.random.default_rng(seed)
    n_held = max(1, round(fraction * len(unique)))
    held = {unique[i] for i in rng.permutation(len(unique))[:n_held]}
    kept = [e for e, g in zip(examples, groups, strict=True) if g not in held]
    out = [e for e, g in zip(examples, groups, strict=True) if g in held]
    if not kept:
        raise DataError(f"holding out {fraction} of {len(unique)} groups leaves no training examples")
    return kept, out


def _load_model(task: Task, fargs: FinetuneArgs) -> nn.Module:
    from bunmyaku.hub import read_config, resolve_model_dir
    from bunmyaku.models.auto import from_pretrained, model_class

    if fargs.model is None:
        raise ValueError("give --model (a model folder in HF layout)")
    labels = task.label_names()
    if isinstance(task, SentenceEmbedding):
        if fargs.from_scratch:
            raise ValueError("from_scratch is not supported for the bi-encoder")
        return BiEncoder.from_pretrained(fargs.model, pooling=fargs.pooling)
    if fargs.from_scratch:
        hf = read_config(resolve_model_dir(fargs.model))
        cls = model_class(hf["model_type"], task.head)
        config = cls.config_class.from_hf(hf)
        if labels:
            config = config.with_labels(labels)
        model = cls.from_config(config)
    else:
        kwargs = {"num_labels": len(labels), "ignore_mismatched_sizes": True} if labels else {}
        model = from_pretrained(fargs.model, task=task.head, **kwargs)
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    if isinstance(task, TextClassification):
        model.config.problem_type = task.problem_type()
    return model.train()


def _read_splits(task: Task, fargs: FinetuneArgs, seed: int):
    """(train, eval, test) examples with the file each came from."""
    if fargs.train is None:
        raise ValueError("give --train (the training file)")
    train = task.read(fargs.train)
    source = {"train": fargs.train, "eval": fargs.eval or fargs.train, "test": fargs.test or fargs.train}
    test = task.read(fargs.test) if fargs.test else None
    if test is None and fargs.test_split:
        train, test = split_examples(train, task.split_groups(train), fargs.test_split, seed + 1)
    if fargs.eval:
        evaluation = task.read(fargs.eval)
    elif fargs.eval_split:
        train, evaluation = split_examples(train, task.split_groups(train), fargs.eval_split, seed)
    else:
        raise ValueError("give --eval (an evaluation file) or --eval-split (a share of the training file)")
    return train, evaluation, test, source


@contextlib.contextmanager
def _log_to(path: Path):
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package = logging.getLogger("bunmyaku")
    package.addHandler(handler)
    try:
        yield
    finally:
        package.removeHandler(handler)
        handler.close()


def run_finetune(fargs: FinetuneArgs, targs: TrainArgs, step_limit: int | None = None) -> dict[str, Any]:
    """Fine-tune as described by ``fargs`` with the loop settings ``targs``; returns what ``metrics.json`` holds.

    ``fargs.epochs`` sets the length of the run (``targs.max_steps`` is not used: its default would cut
    every run at 1,000 steps); ``step_limit`` stops it earlier, after that many optimizer steps (the CLI
    passes ``--max-steps`` here when it is given).

    The run holds ``targs.output_dir``'s lock throughout; a folder that holds anything is refused unless
    ``fargs.overwrite``, which clears the earlier results (:data:`RESULTS`) before anything else happens.

    Raises:
        DataError, FileNotFoundError, ValueError: bad input data (naming file and line) or options, or an
            output folder that is not empty without ``overwrite``.
        bunmyaku.training.outputs.OutputDirBusy: another run is writing into the output folder.
    """
    out = Path(targs.output_dir)
    with exclusive_output_dir(out):
        cleared = claim_output_dir(out, fargs.overwrite, RESULTS, whole_folder=True)
        with _log_to(out / "finetune.log"):
            if cleared:
                logger.info("Cleared the earlier results in %s: %s", out, ", ".join(cleared))
            try:
                return _run(fargs, targs, out, step_limit)
            except Exception as error:
                logger.error("Fine-tuning failed: %s", error)  # the log says why there are no results
                raise


def claim_output_dir(out: Path, overwrite: bool, results: Iterable[str], whole_folder: bool) -> list[str]:
    """Make ``out`` ready for a run's results; returns the names cleared.

    Args:
        out: the output folder (its lock held by the caller).
        overwrite: clear ``results`` instead of refusing.
        results: the names a run writes there.
        whole_folder: refuse a folder holding anything at all (a run owns its folder); otherwise refuse only
            when one of ``results`` exists.

    Raises:
        ValueError: the folder holds results (or anything, with ``whole_folder``) and ``overwrite`` is off.
    """
    results = list(results)
    if whole_folder:
        present = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
    else:
        present = [name for name in results if (out / name).exists()]
    if not present:
        return []
    if not overwrite:
        shown = ", ".join(present[:6]) + (", ..." if len(present) > 6 else "")
        raise ValueError(
            f"output folder {out} already holds {shown}; pass --overwrite (overwrite=True in Python) to replace "
            "the results there, or choose another --output-dir"
        )
    cleared = []
    for path in [out / name for name in results] + list(out.glob(".*.tmp")):  # .tmp: a killed run's partial file
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        cleared.append(path.name)
    return cleared


def _run(fargs: FinetuneArgs, targs: TrainArgs, out: Path, step_limit: int | None) -> dict[str, Any]:
    from bunmyaku.tokenization import Tokenizer
    from bunmyaku.training.trainer import Trainer

    started = time.perf_counter()
    task = build_task(fargs)
    train, evaluation, test, source = _read_splits(task, fargs, targs.seed)
    task.fit_labels(train)
    tokenizer = Tokenizer.from_pretrained(fargs.tokenizer or fargs.model)
    torch.manual_seed(targs.seed)
    model = task.prepare_model(_load_model(task, fargs), tokenizer)
    train_features = task.encode(tokenizer, train, source=source["train"])
    eval_features = task.encode(tokenizer, evaluation, source=source["eval"])
    test_features = task.encode(tokenizer, test, source=source["test"]) if test else None

    train_data = GroupedBatches(train_features, targs.batch_size, shuffle=True, seed=targs.seed)
    eval_data = GroupedBatches(eval_features, fargs.eval_batch_size or targs.batch_size)
    steps_per_epoch = max(1, len(train_data) // targs.grad_accum_steps)
    max_steps = max(1, round(fargs.epochs * steps_per_epoch))
    if step_limit is not None:
        max_steps = max(1, min(max_steps, step_limit))
    warmup = round(fargs.warmup_ratio * max_steps) if fargs.warmup_ratio else targs.warmup_steps
    model_dir = out / "model"
    loop_args = dataclasses.replace(
        targs,
        output_dir=str(model_dir),
        batch_size=1,  # one pre-formed batch of targs.batch_size rows per micro-batch
        max_steps=max_steps,
        warmup_steps=warmup,
        eval_every=steps_per_epoch,
        save_every=0,
        keep_last=1,
        resume=False,
    )
    metric = fargs.metric or task.metric
    logger.info(
        "Fine-tuning %s for %s: %d train / %d eval examples (%d / %d rows), %d steps (%d per epoch), best by %s",
        type(model).__name__,
        task.name,
        len(train),
        len(evaluation),
        len(train_features),
        len(eval_features),
        max_steps,
        steps_per_epoch,
        metric,
    )
    objective = TaskObjective(task)
    evaluator = TaskEvaluation(task, objective, evaluation, eval_features, metric, fargs.patience, steps_per_epoch)
    pad = pad_id(tokenizer)
    trainer = Trainer(model, loop_args, train_data, eval_data, GroupCollator(task, pad), objective, [evaluator])
    trainer.fit()

    model.load_state_dict(evaluator.best_state)
    logger.info("Restored the best epoch (%.2f, %s %s)", evaluator.best["epoch"], metric, show(evaluator.best[metric]))
    _save(model, tokenizer, task, fargs, model_dir, targs.export_dtype)
    _tidy(model_dir, out)
    summary: dict[str, Any] = {**evaluator.best, "metric": metric, "epochs_run": trainer.step / steps_per_epoch}
    summary.update(train_examples=len(train), eval_examples=len(evaluation), history=evaluator.history)
    if test_features is not None:
        outputs = infer(task, model, test_features, fargs.eval_batch_size or targs.batch_size, pad)
        summary["test"] = task.metrics(test, test_features, outputs)
        summary["test_examples"] = len(test)
    summary["train_seconds"] = time.perf_counter() - started
    write_jsonl_atomic(out / "predictions.jsonl", task.predictions(evaluation, eval_features, evaluator.best_outputs))
    write_json_atomic(out / "metrics.json", summary, sort_keys=False)  # last: it marks a finished run
    logger.info("Done: %s", {k: v for k, v in summary.items() if k != "history"})
    return summary


def _save(model, tokenizer, task: Task, fargs: FinetuneArgs, model_dir: Path, dtype: str | None) -> None:
    model.save_pretrained(model_dir, dtype=dtype)
    tokenizer.save_pretrained(model_dir)
    settings = dataclasses.asdict(fargs)
    del settings["overwrite"]  # how this run treated its folder, not how to read data for the model
    write_json_atomic(model_dir / SETTINGS_NAME, {"settings": settings, "state": task.state()}, sort_keys=False)


def _tidy(model_dir: Path, out: Path) -> None:
    """Move the Trainer's log, plot and TensorBoard files beside the model folder; drop its last checkpoint."""
    shutil.rmtree(model_dir / "checkpoints", ignore_errors=True)
    for name in ("metrics.jsonl", "loss_curves.png", "tensorboard"):
        if (model_dir / name).exists():
            if (out / name).exists():
                shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
            shutil.move(str(model_dir / name), str(out / name))


@torch.no_grad()
def infer(task: Task, model: nn.Module, features: list[Feature], batch_size: int, pad: int) -> list[torch.Tensor]:
    """The task's per-row outputs for ``features``, in their order (length-sorted batches, eval mode)."""
    check_batch_size(batch_size)
    model.eval()
    device = next(model.parameters()).device
    data = GroupedBatches(features, batch_size)
    outputs: dict[int, torch.Tensor] = {}
    for i in range(len(data)):
        batch = {k: v.to(device) for k, v in task.collate(data[i], pad).items()}
        _, rows = task.forward(model, batch)
        outputs.update(zip(batch["index"].tolist(), rows.cpu(), strict=True))
    return [outputs[i] for i in range(len(features))]


# ------------------------------------------------------------------------------------------------
# A fine-tuned model, again


def load_finetuned(path: str | Path, overrides: dict[str, Any] | None = None, device: str | None = None):
    """(task, model, tokenizer) from a fine-tuned model folder (or the run folder holding ``model/``).

    Args:
        path: ``DIR`` or ``DIR/model``.
        overrides: settings to change, e.g. other column names for a new file.
        device: where to put the model (default: CUDA when available).
    """
    from bunmyaku.models.auto import from_pretrained
    from bunmyaku.tokenization import Tokenizer

    path = Path(path)
    model_dir = path / "model" if (path / "model" / SETTINGS_NAME).is_file() else path
    if not (model_dir / SETTINGS_NAME).is_file():
        raise FileNotFoundError(f"{model_dir} has no {SETTINGS_NAME}: is it a folder written by bunmyaku finetune?")
    record = json.loads((model_dir / SETTINGS_NAME).read_text(encoding="utf-8"))
    settings = {**record["settings"], **{k: v for k, v in (overrides or {}).items() if v is not None}}
    task = build_task(FinetuneArgs(**settings))
    task.load_state(record["state"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(task, SentenceEmbedding):
        model = BiEncoder.from_pretrained(model_dir).to(device)
    else:
        model = from_pretrained(model_dir, task=task.head, device=device)
    return task, model.eval(), Tokenizer.from_pretrained(model_dir)


def predict_file(
    model_path: str | Path, input_path: str | Path, output_path: str | Path, batch_size: int = 32, **overrides: Any
) -> int:
    """Predict every example of ``input_path`` (labels not needed) into a JSONL file, written atomically (a
    failed run leaves the file as it was); returns the count."""
    check_batch_size(batch_size)
    task, model, tokenizer = load_finetuned(model_path, overrides)
    examples = task.read(input_path, labelled=False)
    features = task.encode(tokenizer, examples, labelled=False, source=str(input_path))
    outputs = infer(task, model, features, batch_size, pad_id(tokenizer))
    write_jsonl_atomic(output_path, task.predictions(examples, features, outputs))
    return len(examples)


def evaluate_file(
    model_path: str | Path,
    eval_path: str | Path,
    output_dir: str | Path | None = None,
    batch_size: int = 32,
    overwrite: bool = False,
    **overrides: Any,
) -> dict[str, float | None]:
    """The task's metrics on a labelled file; with ``output_dir``, also metrics.json and predictions.jsonl.

    The output folder's lock is held while evaluating; results already there are refused unless ``overwrite``,
    which clears them first.
    """
    check_batch_size(batch_size)
    with contextlib.ExitStack() as stack:
        out = None
        if output_dir is not None:
            out = stack.enter_context(exclusive_output_dir(output_dir))
            claim_output_dir(out, overwrite, EVAL_RESULTS, whole_folder=False)
        task, model, tokenizer = load_finetuned(model_path, overrides)
        examples = task.read(eval_path)
        features = task.encode(tokenizer, examples, source=str(eval_path))
        outputs = infer(task, model, features, batch_size, pad_id(tokenizer))
        metrics = task.metrics(examples, features, outputs)
        if out is not None:
            write_jsonl_atomic(out / "predictions.jsonl", task.predictions(examples, features, outputs))
            write_json_atomic(out / "metrics.json", metrics, sort_keys=False)
    return metrics
