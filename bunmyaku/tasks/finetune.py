"""Fine-tuning, prediction and evaluation for every task family, on the Trainer.

:func:`finetune` (``bunmyaku.finetune``) is the entry point in Python and the ``bunmyaku finetune`` command is a
thin layer over the same :func:`run_finetune`: one set of options and defaults (:class:`FinetuneArgs`,
:class:`~bunmyaku.training.args.FinetuneTrainArgs`). A run reads the data (files or in-memory rows; a held-out
split of the training data when there is no eval set), fixes the label set on the training data, loads the model
with the task's head (or the same architecture randomly initialised), encodes, and trains with the Trainer: a
:class:`~bunmyaku.tasks.base.BatchPlan` of length-grouped batches (resumable), a :class:`TaskEvaluator` every
epoch or every ``eval_every`` steps, early stopping after ``patience`` evaluations without improvement, and the
best evaluation's weights restored at the end. The output folder::

    DIR/metrics.json         final (best evaluation) eval metrics with plain keys, and the test split's
    DIR/predictions.jsonl    one record per eval example
    DIR/model/               HF layout: config.json (id2label / label2id), weights, tokenizer, finetune.json,
                             README.md (the model card); with LoRA (lora_r), PEFT's adapter_config.json and
                             adapter_model.safetensors instead of the weights (see bunmyaku.models.lora)
    DIR/merged/              with lora_merge: the adapters merged into the base, an ordinary HF folder
    DIR/metrics.jsonl        the training log (loss from step 1, lr, eval metrics); DIR/finetune.log; loss_curves.png
    DIR/checkpoints/         with save_every: what a killed run resumes from (--resume, on by default)

One run owns its output folder: it holds the folder's lock for the whole run, refuses a folder that already
holds anything unless ``overwrite`` (``--overwrite``), which clears the earlier results first, or the folder
holds a killed run's checkpoints (then the run resumes, with the same settings). A run that fails never leaves
an older run's metrics or model looking like its own. Every result file is written through a temporary file and
a rename; ``metrics.json`` comes last, so its presence means the run finished.

Under ``torchrun`` (``torchrun --nproc-per-node N -m bunmyaku finetune ...``, or ``bunmyaku.finetune`` in a script
it launched: the first call joins the process group, which stays until exit) every process reads and encodes the
data, and the Trainer trains data-parallel (``strategy`` ddp, fsdp or hsdp). ``batch_size`` is per process, as in
pretraining: a step takes one length-grouped global batch of ``batch_size x N`` rows, dealt out row by row to the
processes (:class:`~bunmyaku.tasks.base.BatchPlan`), so N processes with ``batch_size`` b train as one process with
``N x b``. Every process evaluates the whole eval set (the same weights give the same metrics everywhere, so the
selection and early stopping agree without a collective, whatever the split). Process 0 alone takes the output
folder's lock, clears it, logs to ``finetune.log`` and writes the results; the others wait for it, and raise if
it failed. ``cv`` runs each fold this way.

``predict_file`` and ``evaluate_file`` load such a model folder again (``finetune.json`` says which task and
columns it was trained with).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn

from bunmyaku.data.loader import check_batch_size
from bunmyaku.data.tables import IN_MEMORY, DataError
from bunmyaku.hub.files import model_in_run_folder, write_json_atomic, write_jsonl_atomic, write_text_atomic
from bunmyaku.models.quantize import check_scheme
from bunmyaku.tasks.base import BatchPlan, Feature, GroupedBatches, Task, pad_id
from bunmyaku.tasks.choice import GPTPairClassification, MultipleChoice
from bunmyaku.tasks.classification import SentenceSimilarityCross, TextClassification
from bunmyaku.tasks.embedding import BiEncoder, SentenceEmbedding
from bunmyaku.tasks.ner import TokenClassification
from bunmyaku.tasks.qa import QuestionAnswering
from bunmyaku.tasks.windows import POOLER_FILE, attach_pooler, check_options, save_pooler, without_pooler
from bunmyaku.training import distributed as dist_utils
from bunmyaku.training import sharding
from bunmyaku.training.args import FinetuneTrainArgs, TrainArgs, check_int, check_number
from bunmyaku.training.outputs import LOCK_NAME, exclusive_output_dir
from bunmyaku.training.plugins import MultiSampleDropout, Plugin
from bunmyaku.training.recipe import build_args, check_keywords, import_object, keyword_signature

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
# what a run writes into its output folder
RESULTS = (
    "metrics.json",
    "predictions.jsonl",
    "model",
    "merged",
    "metrics.jsonl",
    "finetune.log",
    "loss_curves.png",
    "tensorboard",
    "checkpoints",
)
EVAL_RESULTS = ("metrics.json", "predictions.jsonl")
WINDOWED_TASKS = ("token-classification", "question-answering")  # besides the sequence-classification ones


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
    long_strategy: Literal["truncate", "head-tail", "windows"] = "truncate"
    """Texts longer than max_length: truncate (keep the start), head-tail (keep head_tokens from the start and the
    rest from the end), windows (every window of stride-overlapping max_length tokens; per-document results).
    Question answering always windows its contexts (see bunmyaku.tasks.windows)."""
    stride: int = 128
    """Tokens shared by consecutive windows of a long text (windows; QA's contexts)."""
    head_tokens: int = 128
    """head-tail: tokens kept from the start of a long text; the end fills the rest of max_length."""
    window_pooling: Literal["mean", "max", "attention"] = "mean"
    """windows, sequence tasks: how a document's window logits become its logits (attention: learned weights
    over the windows' first-token vectors, saved as window_pooling.safetensors beside the model)."""
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
    callbacks: list[str] = dataclasses.field(default_factory=list)
    """Plugins to add to the Trainer, by import path (package.module:name; a class is made without arguments)."""
    compute_metrics: str | None = None
    """fn(predictions, labels) -> {name: number} by import path (package.module:name): extra eval metrics."""

    multi_sample_dropout: int = 1
    """Multi-sample dropout: train the classification head on N dropout samples, averaging their N losses; 1: off."""

    # intermediate fine-tuning
    init_from: str | None = None
    """Start from a model fine-tuned on another task (RUN or RUN/model): its encoder is kept, its head replaced."""
    keep_head: bool = False
    """With init_from: keep its head too (needs the same head type and label set; else the head is new)."""

    # LoRA
    lora_r: int = 0
    """LoRA rank: train low-rank adapters on lora_targets (and the new head) instead of the whole model; 0: off."""
    lora_alpha: float = 8.0
    """LoRA scale: each adapter's update is multiplied by lora_alpha / lora_r."""
    lora_targets: str | None = None
    """Comma-separated transformers module names to adapt: query,value (BERT), q_proj,v_proj (Llama), c_attn (GPT-2)."""
    lora_dropout: float = 0.0
    """Dropout on the input of each LoRA adapter."""
    lora_merge: bool = False
    """Also write DIR/merged/: the adapters merged into the base weights, a plain HF model folder."""
    lora_quantize: str | None = None
    """QLoRA: keep the frozen base's linear weights in nf4 (4-bit) or int8 (bitsandbytes); None: float32."""

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
        check_int("multi_sample_dropout", self.multi_sample_dropout, low=1)
        self._check_long()
        if self.multi_sample_dropout > 1 and (
            self.task in ("question-answering", "pair-classification")
            or (self.task == "sentence-similarity" and self.encoder == "bi")
        ):
            head = "the bi-encoder (no classifier)" if self.task == "sentence-similarity" else f"{self.task}'s head"
            raise ValueError(
                f"multi_sample_dropout is for classification heads with dropout (text-classification, "
                f"token-classification, multiple-choice, sentence-similarity with encoder cross), not {head}"
            )
        if self.init_from is not None and (self.model is not None or self.from_scratch):
            raise ValueError(
                "init_from starts from a fine-tuned model instead of --model: give one of model, init_from "
                "(and no from_scratch)"
            )
        if self.keep_head and self.init_from is None:
            raise ValueError("keep_head keeps the head of the init_from model: give init_from (RUN/model) too")
        self._check_lora()
        if isinstance(self.callbacks, str):
            self.callbacks = [self.callbacks]
        if isinstance(self.choice_columns, list):
            self.choice_columns = ",".join(self.choice_columns)
        for name in ("text_column", "text_pair_column", "label_column"):
            value = getattr(self, name)
            if isinstance(value, int):  # a position written as a number in YAML
                setattr(self, name, str(value))

    def _check_long(self) -> None:
        check_options(self.long_strategy, self.stride, self.head_tokens, self.window_pooling, self.max_length)
        cross = self.task == "sentence-similarity" and self.encoder == "cross"
        sequence = self.task == "text-classification" or cross
        if self.long_strategy == "head-tail" and not sequence:
            raise ValueError(
                f"long_strategy head-tail is for text-classification and sentence-similarity (cross), not {self.task}: "
                "use windows for token-classification and question-answering"
            )
        if self.long_strategy == "windows" and not sequence and self.task not in WINDOWED_TASKS:
            raise ValueError(
                f"long_strategy windows is for text-classification, sentence-similarity (cross), token-classification "
                f"and question-answering, not {self.task}{' with encoder bi' if self.encoder == 'bi' else ''}"
            )
        if sequence and self.long_strategy == "windows" and self.multi_sample_dropout > 1:
            raise ValueError(
                "multi_sample_dropout averages the head's per-row losses, but with long_strategy windows the loss is "
                "per document over pooled window logits: use one of them"
            )
        if self.window_pooling == "attention" and self.lora_r and self.long_strategy == "windows":
            raise ValueError("window_pooling attention is not saved in a LoRA adapter: use mean or max with lora_r")

    def _check_lora(self) -> None:
        if isinstance(self.lora_targets, (list, tuple)):  # a YAML list
            self.lora_targets = ",".join(self.lora_targets)
        check_int("lora_r", self.lora_r, low=0)
        check_number("lora_alpha", self.lora_alpha, low=0.0, low_open=True)
        check_number("lora_dropout", self.lora_dropout, low=0.0, high=1.0, high_open=True)
        if self.lora_r and not self.targets():
            raise ValueError(
                "lora_r needs lora_targets: transformers' module names to adapt, e.g. query,value for BERT, "
                "q_proj,v_proj for Llama, c_attn for GPT-2"
            )
        if not self.lora_r and (self.lora_targets or self.lora_merge):
            raise ValueError("lora_targets and lora_merge take effect with LoRA on: give lora_r (e.g. 8) too")
        check_scheme(self.lora_quantize, self.lora_r)

    def targets(self) -> list[str]:
        """``lora_targets`` as a list of names."""
        return [t.strip() for t in (self.lora_targets or "").split(",") if t.strip()]


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
# The Trainer's side: objective and evaluation


class TaskObjective:
    """The task's loss as the Trainer wants it: a sum and a count."""

    def __init__(self, task: Task):
        self.task = task

    def count(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """Units the loss averages over."""
        return {"task": self.task.count(batch)}

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        loss, _ = self.task.forward(model, batch)
        return {"task": loss * self.task.count(batch)}, {}


class TaskEvaluator:
    """The Trainer's evaluation callable for a task: eval loss, the task's metrics, and ``compute_metrics``' extras.

    Args:
        task: the task (its label set fixed).
        examples: the evaluation examples; features: their encoded rows.
        batch_size: rows per evaluation batch; pad: the padding id.
        compute_metrics: ``fn(predictions, labels) -> {name: number}``, where ``predictions`` are the records
            ``predictions.jsonl`` holds and ``labels`` the examples' gold labels as the data gives them.
    """

    def __init__(
        self,
        task: Task,
        examples: list[dict[str, Any]],
        features: list[Feature],
        batch_size: int,
        pad: int,
        compute_metrics: Callable[[list[dict[str, Any]], list[Any]], dict[str, Any]] | None = None,
    ):
        self.task, self.examples, self.features = task, examples, features
        self.batch_size, self.pad, self.compute_metrics = batch_size, pad, compute_metrics
        self.outputs: list[torch.Tensor] = []  # the last evaluation's per-row outputs

    def __call__(self, trainer) -> dict[str, float | None]:
        loss, self.outputs = run_batches(
            self.task, trainer.unwrapped_model, self.features, self.batch_size, self.pad, trainer.autocast
        )
        return self.scores(self.outputs, loss)

    def scores(self, outputs: list[torch.Tensor], loss: float | None) -> dict[str, float | None]:
        """{"loss", task metrics, extras} for the given outputs."""
        scores: dict[str, Any] = {"loss": loss, **self.task.metrics(self.examples, self.features, outputs)}
        extras = extra_metrics(self.task, self.compute_metrics, self.examples, self.features, outputs, scores)
        return {**scores, **extras}


def extra_metrics(task, compute_metrics, examples, features, outputs, known: dict[str, Any]) -> dict[str, Any]:
    """``compute_metrics(predictions, labels)``, checked: a dict of numbers (or None) under new names."""
    if compute_metrics is None:
        return {}
    predictions = list(task.predictions(examples, features, outputs))
    extras = compute_metrics(predictions, [task.gold(e) for e in examples])
    if not isinstance(extras, dict):
        raise ValueError(f"compute_metrics must return a dict of metric names to numbers, got {type(extras).__name__}")
    out = {}
    for name, value in extras.items():
        if name in known:
            raise ValueError(f"compute_metrics returned {name!r}, which the task already computes; rename it")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"compute_metrics returned {name!r} = {value!r}; metrics must be numbers (or None)")
        out[str(name)] = None if value is None else float(value)
    return out


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


@dataclass
class Inputs:
    """What a Python caller may hand over as objects rather than as the settings' strings."""

    train: Any = None
    eval: Any = None
    test: Any = None
    model: nn.Module | None = None
    tokenizer: Any = None
    callbacks: list[Plugin] = dataclasses.field(default_factory=list)
    compute_metrics: Callable[..., dict[str, Any]] | None = None


def _load_model(task: Task, fargs: FinetuneArgs, given: nn.Module | None) -> nn.Module:
    from bunmyaku.hub import read_config, resolve_model_dir
    from bunmyaku.models.auto import from_pretrained, model_class

    labels = task.label_names()
    if given is not None:
        if fargs.from_scratch:
            raise ValueError("from_scratch needs a model folder, not a loaded model")
        model = given
        heads = getattr(model.config, "num_labels", None)
        if labels and heads is not None and heads != len(labels):
            raise ValueError(
                f"the loaded model's head has {heads} outputs but the training data has {len(labels)} labels "
                f"({labels}); load it with num_labels={len(labels)}, or pass the model folder instead"
            )
    elif fargs.init_from is not None:
        model = _load_intermediate(task, fargs, labels)
    elif fargs.model is None:
        raise ValueError("give --model (a model folder in HF layout) or --init-from (RUN/model)")
    elif isinstance(task, SentenceEmbedding):
        if fargs.from_scratch:
            raise ValueError("from_scratch is not supported for the bi-encoder")
        return BiEncoder.from_pretrained(fargs.model, pooling=fargs.pooling)
    elif fargs.from_scratch:
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


def _load_intermediate(task: Task, fargs: FinetuneArgs, labels: list[str] | None) -> nn.Module:
    """The model of ``fargs.init_from`` with this task's head: the encoder as fine-tuned there, the head kept
    only with ``keep_head`` when its type and labels are the same, else freshly initialised (and logged)."""
    from bunmyaku.hub import read_config, resolve_model_dir
    from bunmyaku.models.auto import from_pretrained, model_class

    if isinstance(task, SentenceEmbedding):
        raise ValueError("init_from replaces a task head, and the bi-encoder has none: pass the folder as --model")
    source = model_in_run_folder(Path(fargs.init_from))
    if (source / "adapter_config.json").is_file():
        raise ValueError(
            f"init_from {source} is a LoRA adapter, not a whole model: merge it first "
            f"(bunmyaku merge-lora {source} --output-dir MERGED) and give MERGED as init_from"
        )
    hf = read_config(resolve_model_dir(source))
    cls = model_class(hf["model_type"], task.head)
    before = (hf.get("architectures") or [None])[0]
    old_labels = [hf.get("id2label", {})[k] for k in sorted(hf.get("id2label", {}), key=int)]
    new_labels = labels or []
    same = before == cls.hf_architecture and (old_labels == new_labels if labels else len(old_labels) <= 1)
    if fargs.keep_head and not same:
        raise ValueError(
            f"keep_head: {source} has a {before} head with labels {old_labels}, but this task needs a "
            f"{cls.hf_architecture} head with labels {new_labels}; drop keep_head to start with a new head"
        )
    kwargs = {"num_labels": len(labels), "ignore_mismatched_sizes": True} if labels else {}
    model = from_pretrained(source, task=task.head, **kwargs)
    if fargs.keep_head:
        logger.info("Starting from %s with its encoder and its %s head (labels %s)", source, before, old_labels)
        return model
    prefix = type(model).our_base_prefix
    tied = set(model.tied_weights())
    fresh = type(model).from_config(model.config).state_dict()  # the head's own initialisation, seeded
    state = model.state_dict()
    renewed = [n for n in state if not n.startswith(prefix) and n not in tied]
    with torch.no_grad():
        for name in renewed:
            state[name].copy_(fresh[name])
    reason = "the same head and labels, but keep_head is off" if same else "another head or label set"
    logger.info(
        "Starting from %s: encoder kept, head re-initialised (%d tensors; %s: was %s %s, now %s %s)",
        source,
        len(renewed),
        reason,
        before,
        old_labels,
        cls.hf_architecture,
        new_labels,
    )
    return model


def _read_splits(task: Task, fargs: FinetuneArgs, inputs: Inputs, seed: int):
    """(train, eval, test) examples, and per split the file it came from ("" for in-memory data)."""
    given = {
        name: getattr(inputs, name) if getattr(inputs, name) is not None else getattr(fargs, name)
        for name in ("train", "eval", "test")
    }
    if given["train"] is None:
        raise ValueError("give --train (the training file, or in-memory data in Python)")
    train, train_source = task.read_data(given["train"])
    source = {"train": train_source, "eval": train_source, "test": train_source}
    test = None
    if given["test"] is not None:
        test, source["test"] = task.read_data(given["test"])
    elif fargs.test_split:
        train, test = split_examples(train, task.split_groups(train), fargs.test_split, seed + 1)
    if given["eval"] is not None:
        evaluation, source["eval"] = task.read_data(given["eval"])
    elif fargs.eval_split:
        train, evaluation = split_examples(train, task.split_groups(train), fargs.eval_split, seed)
    else:
        raise ValueError(
            "no evaluation data: give --eval / eval= (a file or rows) or --eval-split / eval_split= "
            "(a share of the training data)"
        )
    return train, evaluation, test, source


@contextlib.contextmanager
def _log_to(path: Path, append: bool = False):
    handler = logging.FileHandler(path, mode="a" if append else "w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    package = logging.getLogger("bunmyaku")
    level = package.level
    if package.getEffectiveLevel() > logging.INFO:  # the log file holds the run's story whatever the console shows
        package.setLevel(logging.INFO)
    package.addHandler(handler)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
        handler.close()


def run_finetune(fargs: FinetuneArgs, targs: TrainArgs, inputs: Inputs | None = None) -> FinetuneResult:
    """Fine-tune as described by ``fargs`` with the loop settings ``targs``; :func:`finetune` is the friendlier
    front door (keyword arguments, in-memory data) and the CLI's.

    ``fargs.epochs`` sets the length of the run; ``targs.max_steps`` (when not 0) stops it earlier. Evaluation
    runs every ``targs.eval_every`` steps (0: every epoch) and at the end; the best evaluation by ``fargs.metric``
    is restored at the end; ``targs.save_every`` writes checkpoints a killed run resumes from exactly.

    With ``targs.output_dir`` the run holds that folder's lock throughout; a folder that holds anything is refused
    unless ``fargs.overwrite`` (which clears the earlier results, :data:`RESULTS`, first) or it holds a killed
    run's checkpoints and ``targs.resume`` is on (the run continues). Without an output folder nothing is written
    (checkpoints, if any, go to a temporary folder removed at the end).

    Raises:
        DataError, FileNotFoundError, ValueError: bad input data (naming file and line) or options, or an
            output folder that is not empty without ``overwrite``.
        bunmyaku.training.outputs.OutputDirBusy: another run is writing into the output folder.
    """
    if targs.swa_start and targs.swa_start >= fargs.epochs:
        raise ValueError(
            f"swa_start ({targs.swa_start:g}) must be below epochs ({fargs.epochs:g}): averaging starts at that epoch"
        )
    if targs.save_every and task_uses_pooler(fargs):
        raise ValueError(
            "window_pooling attention: resumable checkpoints (save_every) hold the HF weights only, not the pooler; "
            "drop save_every or use window_pooling mean / max"
        )
    inputs = dataclasses.replace(inputs or Inputs())
    inputs.callbacks = [_plugin(path) for path in fargs.callbacks] + list(inputs.callbacks)
    if inputs.compute_metrics is None and fargs.compute_metrics:
        inputs.compute_metrics = import_object(fargs.compute_metrics, "compute_metrics")
        if not callable(inputs.compute_metrics):
            raise ValueError(f"compute_metrics {fargs.compute_metrics!r} is not callable")
    dist_utils.join_from_env()  # under torchrun (the CLI has joined already; a script's first call joins)
    if targs.strategy != "ddp" and dist_utils.world_size() > 1:
        _check_shardable(fargs)
    if targs.output_dir is None:
        with _scratch_dir() as scratch:
            return _run(fargs, targs, scratch, inputs, keep=False)
    out = Path(targs.output_dir)
    with contextlib.ExitStack() as stack:
        # process 0 owns the folder (its lock, clearing it, the log); the others wait for its verdict
        resuming, cleared, retry = on_main(_claim_run_dir, stack, out, fargs, targs) or (False, [], False)
        if dist_utils.is_main():
            stack.enter_context(_log_to(out / "finetune.log", append=resuming or retry))
        if retry:
            logger.info("%s holds only the log of a run that wrote no results: this run continues that log", out)
        if cleared:
            logger.info("Cleared the earlier results in %s: %s", out, ", ".join(cleared))
        try:
            return _run(fargs, targs, out, inputs, keep=True)
        except Exception as error:
            logger.error("Fine-tuning failed: %s", error)  # the log says why there are no results
            raise


def _claim_run_dir(stack: contextlib.ExitStack, out: Path, fargs: FinetuneArgs, targs: TrainArgs):
    """Take ``out``'s lock (held until ``stack`` closes) and make it ready; returns (resuming, names cleared,
    retry). ``retry``: the folder holds nothing but the log of a run that stopped before writing any result (a
    missing file, a bad option): there is nothing to protect, so the new run takes it and appends to that log."""
    stack.enter_context(exclusive_output_dir(out))
    resuming = targs.resume and not fargs.overwrite and _resumable(out)
    held = {p.name for p in out.iterdir() if p.name != LOCK_NAME and not p.name.endswith(".tmp")}
    retry = not resuming and not fargs.overwrite and held == {"finetune.log"}
    cleared = [] if resuming or retry else claim_output_dir(out, fargs.overwrite, RESULTS, whole_folder=True)
    return resuming, cleared, retry


def on_main(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on process 0 only (its result there, None elsewhere); when it raises, every process raises,
    so none waits in a collective for a process that failed. Without a process group: just ``fn(*args)``."""
    if dist_utils.world_size() == 1:
        return fn(*args)
    result, error = None, None
    if dist_utils.is_main():
        try:
            result = fn(*args)
        except Exception as caught:  # re-raised below, after the others have heard of it
            error = caught
    failure = dist_utils.gather_objects(None if error is None else f"{type(error).__name__}: {error}")[0]
    if error is not None:
        raise error
    if failure is not None:
        raise RuntimeError(f"process 0 failed: {failure}")
    return result


def shared_from_main(value: Any) -> Any:
    """Process 0's ``value`` on every process (a decision all must take alike; ``value`` itself without a group)."""
    return dist_utils.gather_objects(value)[0] if dist_utils.world_size() > 1 else value


@contextlib.contextmanager
def _scratch_dir():
    """A temporary folder for a run without output folder, the same one for every process (sharded checkpoints
    are written by all of them); removed at the end by process 0."""
    if dist_utils.world_size() == 1:
        with tempfile.TemporaryDirectory(prefix="bunmyaku-finetune-") as scratch:
            yield Path(scratch)
        return
    made = tempfile.mkdtemp(prefix="bunmyaku-finetune-") if dist_utils.is_main() else None
    scratch = Path(shared_from_main(made))
    try:
        yield scratch
        dist_utils.barrier()  # everyone is done with it
    finally:
        if dist_utils.is_main():
            shutil.rmtree(scratch, ignore_errors=True)


def _check_shardable(fargs: FinetuneArgs) -> None:
    """Sharded fine-tuning hands back a plain copy of the model class: refuse what that copy would lose."""
    lost = []
    if fargs.lora_r:
        lost.append("LoRA adapters (lora_r)")
    if task_uses_pooler(fargs):
        lost.append("the window attention pooler (window_pooling attention)")
    if fargs.task == "sentence-similarity" and fargs.encoder == "bi":
        lost.append("the bi-encoder (encoder bi)")
    if lost:
        raise ValueError(
            f"strategy fsdp / hsdp fine-tuning supports the models with a task head, not {', '.join(lost)}: "
            "use strategy ddp for it"
        )


def _head_plugins(fargs: FinetuneArgs) -> list[Plugin]:
    """The plugins FinetuneArgs switches on (the Trainer builds those of TrainArgs)."""
    return [MultiSampleDropout(fargs.multi_sample_dropout)] if fargs.multi_sample_dropout > 1 else []


def _plugin(path: str) -> Plugin:
    found = import_object(path, "callbacks")
    plugin = found() if isinstance(found, type) else found
    if not isinstance(plugin, Plugin):
        raise ValueError(f"callback {path!r} is a {type(plugin).__name__}, not a bunmyaku.training.Plugin")
    return plugin


def _resumable(out: Path) -> bool:
    """A killed run's folder: checkpoints and no metrics.json (which marks a finished run)."""
    from bunmyaku.training.checkpoint import list_checkpoints

    checkpoints = out / "checkpoints"
    return checkpoints.is_dir() and bool(list_checkpoints(checkpoints)) and not (out / "metrics.json").exists()


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


def _check_resumed_settings(out: Path, record: dict[str, Any]) -> None:
    """A resumed run must be the same run: compare its settings with the ones the checkpoints were written with."""
    path = out / "checkpoints" / SETTINGS_NAME
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(before) | set(record) if before.get(k) != record.get(k))
        if changed:
            raise ValueError(
                f"{out} holds checkpoints of a run with other settings ({', '.join(changed)}); resume with the same "
                "settings, or pass --overwrite (overwrite=True) to start again"
            )
    else:
        path.parent.mkdir(exist_ok=True)
        write_json_atomic(path, record, sort_keys=False)


# settings that do not change what a run computes: they may differ when a killed run is resumed
NOT_COMPARED = ("overwrite", "resume", "progress", "plot", "output_dir", "device", "num_threads")


def _run(fargs: FinetuneArgs, targs: TrainArgs, out: Path, inputs: Inputs, keep: bool) -> FinetuneResult:
    from bunmyaku.tokenization import Tokenizer
    from bunmyaku.training.trainer import Trainer

    started = time.perf_counter()
    task = build_task(fargs)
    train, evaluation, test, source = _read_splits(task, fargs, inputs, targs.seed)
    task.fit_labels(train)
    tokenizer = inputs.tokenizer
    if tokenizer is None:
        if inputs.model is not None and fargs.tokenizer is None:
            raise ValueError("give tokenizer= (a Tokenizer or a folder) with an already loaded model")
        tokenizer = Tokenizer.from_pretrained(fargs.tokenizer or fargs.model or _init_dir(fargs))
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer.from_pretrained(tokenizer)
    torch.manual_seed(targs.seed)
    model = _with_lora(fargs, targs, task, _load_model(task, fargs, inputs.model), tokenizer)
    train_features = task.encode(tokenizer, train, source=source["train"])
    eval_features = task.encode(tokenizer, evaluation, source=source["eval"])
    test_features = task.encode(tokenizer, test, source=source["test"]) if test else None

    pad = pad_id(tokenizer)
    world = dist_utils.world_size()  # batch_size is per process: a step takes batch_size x world rows
    plan = BatchPlan(
        GroupedBatches(train_features, targs.batch_size * world, shuffle=True, seed=targs.seed),
        functools.partial(task.collate, pad=pad),
        dist_utils.rank(),
        world,
    )
    eval_batch_size = fargs.eval_batch_size or targs.batch_size
    steps_per_epoch = max(1, plan.batches_per_epoch // targs.grad_accum_steps)
    max_steps = max(1, round(fargs.epochs * steps_per_epoch))
    if targs.max_steps:
        max_steps = min(max_steps, targs.max_steps)
    warmup = round(fargs.warmup_ratio * max_steps) if fargs.warmup_ratio else targs.warmup_steps
    loop_args = dataclasses.replace(
        targs,
        output_dir=str(out),
        max_steps=max_steps,
        warmup_steps=warmup,
        eval_every=targs.eval_every or steps_per_epoch,
        plot=targs.plot and keep,
    )
    if keep and (targs.save_every or (out / "checkpoints").is_dir()):
        record = {**_settings(fargs), **dataclasses.asdict(targs)}
        on_main(_check_resumed_settings, out, {k: v for k, v in record.items() if k not in NOT_COMPARED})
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
    evaluator = TaskEvaluator(task, evaluation, eval_features, eval_batch_size, pad, inputs.compute_metrics)
    base = _base_model_name(fargs, inputs)
    trainer = Trainer(
        model,
        loop_args,
        plan,
        objective=TaskObjective(task),
        plugins=inputs.callbacks + _head_plugins(fargs),
        evaluate=evaluator,
        metric=metric,
        patience=fargs.patience,
        restore_best=True,
        export_dir=None,  # the model is saved below, with its settings and model card
        checkpoint_at_end=False,
        title=f"{out.name if keep else 'in-memory run'}: {base}, {task.name}",
    )
    trainer.fit()
    if sharding.is_sharded(model):  # every process gets the whole trained model back (a collective)
        model = sharding.unsharded(model)
    model.eval()

    best = trainer.selected
    logger.info(
        "Best evaluation: step %d (epoch %.2f), %s %s",
        best["step"],
        best["step"] / steps_per_epoch,
        metric,
        show(best.get(f"eval_{metric}")),
    )
    summary: dict[str, Any] = {k.removeprefix("eval_"): v for k, v in best.items() if k.startswith("eval_")}
    summary.update(epoch=best["step"] / steps_per_epoch, step=best["step"], metric=metric)
    summary["epochs_run"] = trainer.step / steps_per_epoch
    summary.update(train_examples=len(train), eval_examples=len(evaluation))
    summary["history"] = [{"epoch": e["step"] / steps_per_epoch, **e} for e in trainer.evaluations]
    # the best weights are loaded: their outputs on the eval split are the predictions (as evaluated, same batches)
    _, best_outputs = run_batches(task, model, eval_features, eval_batch_size, pad, trainer.autocast)
    if test_features is not None:
        _, outputs = run_batches(task, model, test_features, eval_batch_size, pad, trainer.autocast)
        test_scores = task.metrics(test, test_features, outputs)
        summary["test"] = {
            **test_scores,
            **extra_metrics(task, inputs.compute_metrics, test, test_features, outputs, test_scores),
        }
        summary["test_examples"] = len(test)
    summary["train_seconds"] = time.perf_counter() - started
    result = FinetuneResult(
        metrics=summary,
        model=model,
        tokenizer=tokenizer,
        history=trainer.history,
        task=task,
        settings=fargs,
        train_settings=targs,
        base_model=base,
        data=_data_names(fargs, inputs),
        compute_metrics=inputs.compute_metrics,
    )
    if keep:  # by process 0 alone; the others return once the results are written (or raise if that failed)
        on_main(_write_results, result, out, evaluation, eval_features, best_outputs)
    if fargs.lora_merge and not fargs.lora_quantize and not (keep and dist_utils.is_main()):  # see _write_results
        _merge(model)
    logger.info("Done: %s", {k: v for k, v in summary.items() if k != "history"})
    return result


def _write_results(result: FinetuneResult, out: Path, evaluation, eval_features, best_outputs) -> None:
    """model/, merged/ (lora_merge), predictions.jsonl, and metrics.json last (it marks a finished run)."""
    result.save(out / "model")
    if result.settings.lora_merge and result.settings.lora_quantize:  # onto the full-precision base (merge_lora)
        from bunmyaku.models.lora import merge_adapter_dir

        merge_adapter_dir(out / "model", out / "merged", dtype=result.train_settings.export_dtype, overwrite=True)
    elif result.settings.lora_merge:
        _merge(result.model)
        result.save(out / "merged")
    write_jsonl_atomic(out / "predictions.jsonl", result.task.predictions(evaluation, eval_features, best_outputs))
    write_json_atomic(out / "metrics.json", result.metrics, sort_keys=False)


def _merge(model: nn.Module) -> None:
    from bunmyaku.models.lora import merge_lora

    merge_lora(model).eval()  # the returned model too: the same outputs, without adapters


def _with_lora(fargs: FinetuneArgs, targs: TrainArgs, task: Task, model: nn.Module, tokenizer: Any) -> nn.Module:
    """The task's model, with LoRA adapters when ``fargs.lora_r`` (only they and the new head train)."""
    if not fargs.lora_r:
        return task.prepare_model(model, tokenizer)
    from bunmyaku.models.lora import add_lora
    from bunmyaku.models.quantize import quantize_base

    if isinstance(task, SentenceEmbedding):
        raise ValueError("LoRA is not supported for the bi-encoder (sentence-similarity with encoder=bi)")
    if targs.save_every:
        raise ValueError("LoRA runs do not write resumable checkpoints yet: drop save_every (or lora_r)")
    vocab = model.get_input_embeddings().num_embeddings
    model = task.prepare_model(model, tokenizer)
    if model.get_input_embeddings().num_embeddings != vocab:
        raise ValueError(
            f"{fargs.task} adds tokens to the vocabulary, but LoRA keeps the base model's embeddings frozen and "
            "the adapter must load onto the base: fine-tune without lora_r"
        )
    if fargs.lora_quantize:
        if targs.strategy != "ddp" or targs.tp > 1:
            raise ValueError(
                f"lora_quantize: the quantized base cannot be sharded (strategy {targs.strategy}, tp {targs.tp}); "
                "QLoRA runs in one process or under strategy ddp"
            )
        quantize_base(model, fargs.lora_quantize)
    return add_lora(model, fargs.lora_r, fargs.lora_alpha, fargs.targets(), fargs.lora_dropout)


def _init_dir(fargs: FinetuneArgs) -> str | None:
    return None if fargs.init_from is None else str(model_in_run_folder(Path(fargs.init_from)))


def _base_model_name(fargs: FinetuneArgs, inputs: Inputs) -> str:
    if inputs.model is None:
        return str(fargs.model or _init_dir(fargs))
    return str(getattr(inputs.model.config, "name_or_path", None) or f"an in-memory {type(inputs.model).__name__}")


def _data_names(fargs: FinetuneArgs, inputs: Inputs) -> dict[str, str]:
    names = {}
    for split in ("train", "eval", "test"):
        if getattr(inputs, split) is not None:
            names[split] = IN_MEMORY
        elif getattr(fargs, split) is not None:
            names[split] = str(getattr(fargs, split))
    return names


def _settings(fargs: FinetuneArgs) -> dict[str, Any]:
    """The settings a saved model remembers (how to read data for it), without the run-only ones."""
    settings = dataclasses.asdict(fargs)
    for name in ("overwrite", "callbacks", "compute_metrics"):  # how this run went, not how to read data
        del settings[name]
    return settings


def run_batches(
    task: Task,
    model: nn.Module,
    features: list[Feature],
    batch_size: int,
    pad: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[float | None, list[torch.Tensor]]:
    """The mean loss (None without labels) and the task's per-row outputs for ``features``, in their order
    (length-sorted batches, eval mode, no gradients)."""
    check_batch_size(batch_size)
    model.eval()
    device = next(model.parameters()).device
    data = GroupedBatches(features, batch_size)
    outputs: dict[int, torch.Tensor] = {}
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):
            batch = {k: v.to(device) for k, v in task.collate(data[i], pad).items()}
            with autocast():
                loss, rows = task.forward(model, batch)
            if loss is not None:
                n = task.count(batch)
                loss_sum, count = loss_sum + float(loss) * n, count + n
            outputs.update(zip(batch["index"].tolist(), rows.cpu(), strict=True))
    return (loss_sum / max(count, 1) if count else None), [outputs[i] for i in range(len(features))]


def infer(task: Task, model: nn.Module, features: list[Feature], batch_size: int, pad: int) -> list[torch.Tensor]:
    """The task's per-row outputs for ``features``, in their order (length-sorted batches, eval mode)."""
    return run_batches(task, model, features, batch_size, pad)[1]


# ------------------------------------------------------------------------------------------------
# The Python API


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the trained model (best evaluation's weights, eval mode) and its metrics.

    Attributes:
        metrics: what ``metrics.json`` holds (the best evaluation's metrics with plain keys, ``history``, ...).
        model: the fine-tuned model, in eval mode.
        tokenizer: its tokenizer.
        history: the training log's records (``metrics.jsonl``): train loss, learning rate, eval metrics by step.
    """

    metrics: dict[str, Any]
    model: nn.Module
    tokenizer: Any
    history: list[dict[str, Any]]
    task: Task = dataclasses.field(repr=False)
    settings: FinetuneArgs = dataclasses.field(repr=False)
    train_settings: TrainArgs = dataclasses.field(repr=False)
    base_model: str = ""
    data: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
    compute_metrics: Callable[..., dict[str, Any]] | None = dataclasses.field(default=None, repr=False)

    def _encode(self, data: Any, labelled: bool):
        examples, source = self.task.read_data(data, labelled=labelled)
        features = self.task.encode(self.tokenizer, examples, labelled=labelled, source=source)
        batch_size = self.settings.eval_batch_size or self.train_settings.batch_size
        return examples, features, run_batches(self.task, self.model, features, batch_size, pad_id(self.tokenizer))

    def __repr__(self) -> str:  # the model and the history would flood a notebook
        shown = {k: v for k, v in self.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return f"FinetuneResult(task={self.settings.task!r}, model={type(self.model).__name__}, metrics={shown})"

    def predict(self, data: Any) -> list[dict[str, Any]]:
        """Predictions for ``data`` (a file path, in-memory rows, or plain texts: a list or pandas Series of
        strings, or of (text, pair) tuples for sentence pairs; labels not needed): the records
        ``predictions.jsonl`` would hold, one per example."""
        examples, features, (_, outputs) = self._encode(self._rows_from_texts(data), labelled=False)
        return list(self.task.predictions(examples, features, outputs))

    def _rows_from_texts(self, data: Any) -> Any:
        """Plain texts as rows of the task's text columns; anything else as it is."""
        if not (isinstance(data, (list, tuple)) or type(data).__name__ == "Series"):
            return data
        items, s = list(data), self.settings
        if items and all(isinstance(x, str) for x in items):
            return [{s.text_column: x} for x in items]
        pairs = all(isinstance(x, tuple) and len(x) == 2 and all(isinstance(y, str) for y in x) for x in items)
        if items and pairs and s.text_pair_column:
            return [{s.text_column: a, s.text_pair_column: b} for a, b in items]
        return items

    def evaluate(self, data: Any) -> dict[str, Any]:
        """The task's metrics (and ``compute_metrics``' extras) on labelled ``data``, a file path or rows."""
        examples, features, (loss, outputs) = self._encode(data, labelled=True)
        scores = {"loss": loss, **self.task.metrics(examples, features, outputs)}
        return {**scores, **extra_metrics(self.task, self.compute_metrics, examples, features, outputs, scores)}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the model folder a run writes as ``model/``: HF layout (config.json with the label maps, weights,
        tokenizer) that ``transformers`` loads, ``finetune.json`` for ``bunmyaku predict`` / ``evaluate``, and a
        model card (README.md). Returns the folder."""
        from bunmyaku.models.lora import has_lora, save_adapter

        directory = Path(directory)
        if has_lora(self.model):  # PEFT's adapter folder, for the base model it was trained on
            save_adapter(self.model, directory, self.base_model, dtype=self.train_settings.export_dtype)
        else:
            with without_pooler(self.model) as pooler:  # HF weights only: transformers loads the folder
                self.model.save_pretrained(directory, dtype=self.train_settings.export_dtype)
            if pooler is not None:
                save_pooler(self.model, directory)
        self.tokenizer.save_pretrained(directory)
        record = {"settings": _settings(self.settings), "state": self.task.state()}
        write_json_atomic(directory / SETTINGS_NAME, record, sort_keys=False)
        write_text_atomic(directory / "README.md", model_card(self))
        return directory


def model_card(result: FinetuneResult) -> str:
    """A model card (README.md): base model, data, task, metrics, hyperparameters, date, library version."""
    import bunmyaku
    from bunmyaku.models.lora import has_lora

    s, t = result.settings, result.train_settings
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and k not in ("train_seconds",)}
    test = result.metrics.get("test") or {}
    local = Path(result.base_model).exists() or result.base_model.startswith("an in-memory")
    front = ["---", "library_name: bunmyaku", f"tags: [bunmyaku, {s.task}]"]
    if not local:  # a hub repo id: the hub links the card to its base model
        front.append(f"base_model: {result.base_model}")
    lines = [*front, "---", "", f"# {s.task} fine-tuned from {result.base_model}", ""]
    lines += [
        f"Fine-tuned with bunmyaku {bunmyaku.__version__} on "
        f"{datetime.datetime.now(datetime.timezone.utc).date().isoformat()}.",
        "",
        "## Data",
        "",
    ]
    lines += [f"- {split}: {name}" for split, name in result.data.items()] or ["- eval: held out of the training data"]
    if "train" in result.data and "eval" not in result.data:
        lines.append(f"- eval: {s.eval_split:g} of the training data, held out")
    lines += [
        f"- examples: {result.metrics.get('train_examples')} train, {result.metrics.get('eval_examples')} eval",
        "",
        "## Metrics",
        "",
        f"The best evaluation by {result.metrics.get('metric')} (epoch {result.metrics.get('epoch', 0):.2f}):",
        "",
        "| metric | eval |" + (" test |" if test else ""),
        "|---|---|" + ("---|" if test else ""),
    ]
    for name, value in metrics.items():
        if name in ("epoch", "step", "epochs_run", "train_examples", "eval_examples", "test_examples"):
            continue
        row = f"| {name} | {value:.4f} |"
        if test:
            other = test.get(name)
            row += f" {other:.4f} |" if isinstance(other, (int, float)) else " |"
        lines.append(row)
    hyper = {
        "task": s.task,
        "epochs": s.epochs,
        "epochs_run": round(result.metrics.get("epochs_run", 0.0), 4),
        "batch_size": t.batch_size,
        "grad_accum_steps": t.grad_accum_steps,
        "lr": t.lr,
        "schedule": t.schedule,
        "warmup_ratio": s.warmup_ratio,
        "weight_decay": t.weight_decay,
        "max_length": s.max_length,
        "precision": t.precision,
        "seed": t.seed,
    }
    if s.lora_r:
        hyper.update(lora_r=s.lora_r, lora_alpha=s.lora_alpha, lora_targets=s.lora_targets, lora_dropout=s.lora_dropout)
        if s.lora_quantize:
            hyper.update(lora_quantize=s.lora_quantize)
    lines += ["", "## Hyperparameters", "", *[f"- {k}: {v}" for k, v in hyper.items()], ""]
    lines += [
        "## Use",
        "",
        "```python",
        "import bunmyaku",
        "",
        'model = bunmyaku.from_pretrained("THIS_FOLDER")',
        "```",
        "",
        "The folder is in Hugging Face layout: `transformers` loads it too.",
        "",
    ]
    if has_lora(result.model):
        lines[-2] = (
            "The folder is a LoRA adapter in PEFT's format for its base model (adapter_config.json): "
            "`peft.PeftModel.from_pretrained(base, THIS_FOLDER)` loads it onto the `transformers` model; "
            "`bunmyaku merge-lora THIS_FOLDER --output-dir OUT` writes the merged model."
        )
    return "\n".join(lines)


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
    model_dir = model_in_run_folder(path)
    record = run_record(model_dir)
    if record is None:
        raise FileNotFoundError(f"{model_dir} has no {SETTINGS_NAME}: is it a folder written by bunmyaku finetune?")
    settings = {**record["settings"], **{k: v for k, v in (overrides or {}).items() if v is not None}}
    task = build_task(FinetuneArgs(**settings))
    task.load_state(record["state"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(task, SentenceEmbedding):
        model = BiEncoder.from_pretrained(model_dir).to(device)
    else:
        model = from_pretrained(model_dir, task=task.head, device=device)
        if (model_dir / POOLER_FILE).is_file() or task_uses_pooler(task.settings):
            attach_pooler(model, model_dir)
    return task, model.eval(), Tokenizer.from_pretrained(model_dir)


def run_record(model_dir: str | Path) -> dict[str, Any] | None:
    """What a fine-tuning run saved beside its model (``finetune.json``: ``settings`` such as max_length and the
    long-input options, and the task's ``state``); None for a folder no run wrote."""
    path = Path(model_dir) / SETTINGS_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise ValueError(f"{path}: not the record of a fine-tuning run (expected a 'settings' mapping)")
    return record


def task_uses_pooler(settings: FinetuneArgs) -> bool:
    """Whether the settings train a window attention pooler (saved as window_pooling.safetensors)."""
    windowed = settings.long_strategy == "windows" and settings.window_pooling == "attention"
    return windowed and settings.task in ("text-classification", "sentence-similarity")


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
        loss, outputs = run_batches(task, model, features, batch_size, pad_id(tokenizer))
        metrics = {"loss": loss, **task.metrics(examples, features, outputs)}  # as FinetuneResult.evaluate
        if out is not None:
            write_jsonl_atomic(out / "predictions.jsonl", task.predictions(examples, features, outputs))
            write_json_atomic(out / "metrics.json", metrics, sort_keys=False)
    return metrics


# ------------------------------------------------------------------------------------------------
# bunmyaku.finetune


OPTION_CLASSES = (FinetuneArgs, FinetuneTrainArgs)


def finetune(**options: Any) -> FinetuneResult:
    """Fine-tune a model for a task: the Python twin of ``bunmyaku finetune``, with the command's options as
    keyword arguments (``--text-column`` is ``text_column``) and the same defaults (both read them from
    :class:`FinetuneArgs` and :class:`~bunmyaku.training.args.FinetuneTrainArgs`).

    Besides what the command takes, Python may pass objects:

    - ``train`` / ``eval`` / ``test``: a file path (str or Path), a list of dicts, a pandas DataFrame, or a
      ``datasets.Dataset`` (one split of a ``DatasetDict``);
    - ``model``: a folder (str or Path), a hub repo id, or an already loaded bunmyaku model (then give
      ``tokenizer``: a ``bunmyaku.Tokenizer`` or a folder);
    - ``callbacks``: :class:`~bunmyaku.training.plugins.Plugin` objects (or import paths ``package.module:name``),
      whose hooks the Trainer calls; ``compute_metrics``: ``fn(predictions, labels) -> {name: number}`` (or its
      import path), with the records ``predictions.jsonl`` holds and the examples' gold labels; its metrics join
      the eval metrics;
    - ``output_dir=None`` (the default) writes nothing; a folder gets the run's results as the command writes them.

    Example::

        result = bunmyaku.finetune(task="text-classification", model="bert-tiny", train=df, eval_split=0.2)
        result.metrics["accuracy"], result.predict(["a great film"]), result.save("my-model")

    Returns:
        A :class:`FinetuneResult`: ``metrics``, the trained ``model`` (best evaluation's weights, eval mode),
        ``tokenizer``, ``history``, and ``predict`` / ``evaluate`` / ``save``.

    Raises:
        TypeError: an unknown option.
        DataError, FileNotFoundError, ValueError: bad data (naming file or row and field) or options.
    """
    check_keywords("finetune", options, finetune.__signature__)  # type: ignore[attr-defined]
    values = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in options.items()}
    inputs = Inputs()
    for split in ("train", "eval", "test"):
        if values.get(split) is not None and not isinstance(values[split], str):
            setattr(inputs, split, values.pop(split))
    if isinstance(values.get("model"), nn.Module):
        inputs.model = values.pop("model")
    if values.get("tokenizer") is not None and not isinstance(values["tokenizer"], str):
        inputs.tokenizer = values.pop("tokenizer")
    callbacks = values.pop("callbacks", None) or []
    if isinstance(callbacks, (str, Plugin)):
        callbacks = [callbacks]
    values["callbacks"] = [c for c in callbacks if isinstance(c, str)]
    inputs.callbacks = [c for c in callbacks if not isinstance(c, str)]
    wrong = [type(c).__name__ for c in inputs.callbacks if not isinstance(c, Plugin)]
    if wrong:
        raise TypeError(f"callbacks must be bunmyaku.training.Plugin objects or import paths, got {wrong}")
    if callable(values.get("compute_metrics")):
        inputs.compute_metrics = values.pop("compute_metrics")
    fargs, targs = build_args(OPTION_CLASSES, values)
    return run_finetune(fargs, targs, inputs)


finetune.__signature__ = keyword_signature(OPTION_CLASSES, FinetuneResult)  # type: ignore[attr-defined]
