"""K-fold cross-validation on top of :func:`~bunmyaku.tasks.finetune.run_finetune`: ``bunmyaku cv`` and
``bunmyaku.cv(...)``, for every task family but GPT-style pair classification.

The training file is split into K folds (stratified by label for single-label classification and multiple choice,
by group with ``group_column``, else shuffled K-fold; scikit-learn, seeded by ``fold_seed``). QA questions are
grouped by article with ``group_column="title"`` (their SQuAD ``data`` entry; for in-memory rows their ``title``,
else their context) or by paragraph with ``"context"``. Fold k trains on the other folds and evaluates on itself
(its held-out rows are its eval set, which picks its best epoch). The output folder::

    DIR/oof.jsonl            one record per training example (per question for QA), in file order: the fields of
                             predictions.jsonl, gold, row (0-based), fold and scores (below)
    DIR/metrics.json         the out-of-fold metrics (the task's plain keys)
    DIR/fold_metrics.json    each fold's metrics on its held-out rows, and their mean and std (ddof 0)
    DIR/fold{k}/             fold k's finetune output (DIR/fold{k}/seed{s}/ with several seeds)
    DIR/test_predictions.jsonl, DIR/test_metrics.json   with a test file: scores averaged over folds and seeds
    DIR/cv.json              the settings; a rerun with other settings is refused unless overwrite

``scores`` per family (:mod:`bunmyaku.tasks.averaging` defines them, averages them and decodes them):

- classification: every class's probability in id2label order (softmax; sigmoid for multi-label); regression and
  the cross-encoder: the value;
- multiple choice: every choice's probability (softmax over the choices); ``label`` is the chosen index, ``score``
  its probability;
- bi-encoder similarity: the cosine (also ``cosine``); metrics ``pearson`` and ``spearman`` against the gold
  scores (the in-batch retrieval accuracy finetune reports depends on the batches and has no out-of-fold form);
- token classification: per word (CoNLL) or per character of the text (spans) the probabilities over id2label,
  null where no token covers the unit; ``tags`` / ``entities`` are decoded from the averaged scores. CoNLL metrics
  compare the word tags of the words the model saw; span metrics compare gold and predicted entities as BIO tags
  over the characters (an entity counts when type, start and end match);
- QA: the n-best answers ``[{"start", "end", "text", "probability"}]`` (character offsets, the null answer as
  start = end = -1); ``prediction_text`` is the most probable one, ``score`` its probability.

With several ``seeds`` every fold is trained once per seed and the scores are averaged, test scores over every
fold and seed model. A rerun of the same command skips finished folds (``metrics.json`` present) and resumes an
unfinished one from its checkpoints (finetune's resume, with ``save_every``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bunmyaku.hub.files import write_json_atomic, write_jsonl_atomic
from bunmyaku.tasks import averaging
from bunmyaku.tasks.base import pad_id
from bunmyaku.tasks.finetune import (
    FinetuneArgs,
    Inputs,
    _settings,
    build_task,
    infer,
    load_finetuned,
    on_main,
    run_finetune,
    shared_from_main,
)
from bunmyaku.tasks.metrics import fold_summary, pearson, spearman
from bunmyaku.training import distributed as dist_utils
from bunmyaku.training.args import FinetuneTrainArgs, TrainArgs, check_int
from bunmyaku.training.outputs import exclusive_output_dir
from bunmyaku.training.recipe import build_args, check_keywords, keyword_signature

logger = logging.getLogger(__name__)

SUPPORTED = (
    "text-classification",
    "sentence-similarity",
    "multiple-choice",
    "token-classification",
    "question-answering",
)
CV_RESULTS = ("oof.jsonl", "metrics.json", "fold_metrics.json", "test_predictions.jsonl", "test_metrics.json")


@dataclass
class CvArgs:
    """How to cross-validate: the number of folds, how they are drawn, the seeds every fold is trained with."""

    folds: int = 5
    """Number of folds K (each example is held out exactly once)."""
    fold_seed: int = 0
    """Seed of the fold assignment (shuffled, stratified or grouped)."""
    group_column: str | None = None
    """Keep the rows sharing this column's value in one fold (group k-fold, e.g. QA by article)."""
    seeds: str | None = None
    """Comma-separated training seeds (0,1,2): every fold is trained once per seed, predictions averaged
    (default: the seed option)."""

    def __post_init__(self) -> None:
        check_int("folds", self.folds, low=2)
        check_int("fold_seed", self.fold_seed)
        if isinstance(self.seeds, (list, tuple)):
            self.seeds = ",".join(str(s) for s in self.seeds)
        if isinstance(self.seeds, int):
            self.seeds = str(self.seeds)
        if self.seeds is not None:
            self.seed_list()

    def seed_list(self) -> list[int]:
        try:
            values = [int(s) for s in str(self.seeds).split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"seeds must be comma-separated integers such as 0,1,2, got {self.seeds!r}") from None
        if not values or len(set(values)) != len(values):
            raise ValueError(f"seeds must be distinct comma-separated integers such as 0,1,2, got {self.seeds!r}")
        return values


OPTION_CLASSES = (CvArgs, FinetuneArgs, FinetuneTrainArgs)


@dataclass
class CvResult:
    """What :func:`cv` returns: the out-of-fold metrics and records, and per-fold metrics."""

    metrics: dict[str, Any]
    fold_metrics: dict[str, Any]
    oof: list[dict[str, Any]]
    test_predictions: list[dict[str, Any]] | None = None
    test_metrics: dict[str, Any] | None = None
    output_dir: str = ""


def assign_folds(task: Any, examples: list[dict[str, Any]], cargs: CvArgs, source: str) -> tuple[list[int], str]:
    """Per example its fold (0..K-1), and how the folds were drawn (stratified, group or plain)."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedKFold

    n, k = len(examples), cargs.folds
    if n < k:
        raise ValueError(f"{source or 'the training data'} has {n} examples: too few for {k} folds")
    index = np.arange(n)
    if cargs.group_column:
        groups = []
        for i, example in enumerate(examples):
            value = task.group_value(example, cargs.group_column)
            if value is None:
                raise ValueError(f"{source or 'training data'} row {i + 1}: no group column {cargs.group_column!r}")
            groups.append(str(value))
        if len(set(groups)) < k:
            raise ValueError(f"group k-fold: {len(set(groups))} groups in column {cargs.group_column!r} for {k} folds")
        splitter, kind = GroupKFold(n_splits=k, shuffle=True, random_state=cargs.fold_seed), "group"
        splits = splitter.split(index, groups=groups)
    elif task.name == "multiple-choice" or (task.name == "text-classification" and task.problem == "single-label"):
        labels = [str(e[task.settings.label_column]) for e in examples]
        counts: dict[str, int] = {}
        for label in labels:
            counts[label] = counts.get(label, 0) + 1
        rare = sorted(label for label, c in counts.items() if c < k)
        if rare:
            raise ValueError(
                f"stratified {k}-fold: label(s) {rare} have fewer than {k} examples; use fewer folds or more data"
            )
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=cargs.fold_seed)
        splits, kind = splitter.split(index, labels), "stratified"
    else:
        splits, kind = KFold(n_splits=k, shuffle=True, random_state=cargs.fold_seed).split(index), "plain"
    fold = [-1] * n
    for f, (_, held) in enumerate(splits):
        for i in held:
            fold[int(i)] = f
    return fold, kind


class _TagProbabilities:
    """A token-classification task whose outputs are the tag probabilities per token (its own forward returns
    the argmax tags, all finetune needs)."""

    def __init__(self, task: Any):
        self.task = task

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def forward(self, model, batch):
        return None, averaging.tag_probabilities(model, batch).detach()


def _example_scores(task: Any, model, tokenizer, examples, source: str, batch: int, labelled: bool) -> list[Any]:
    """One model's scores (:mod:`bunmyaku.tasks.averaging`) on ``examples``."""
    features = task.encode(tokenizer, examples, labelled=labelled, source=source)
    runner = _TagProbabilities(task) if averaging.kind_of(task) == "tags" else task
    outputs = infer(runner, model, features, batch, pad_id(tokenizer))
    return averaging.example_scores(task, examples, features, outputs)


def _to_logits(kind: str, scores: torch.Tensor) -> list[torch.Tensor]:
    """Outputs the task decodes back into ``scores`` (averaged probabilities): log p for softmax, logit p for
    sigmoid, the value for regression; so the task's own metrics and predictions serve averaged scores."""
    if kind == "value":
        return list(scores.unsqueeze(-1))
    eps = torch.finfo(scores.dtype).tiny
    if kind == "multi-label":
        p = scores.clamp(eps, 1 - 1e-7)
        return list(torch.log(p) - torch.log1p(-p))
    return list(torch.log(scores.clamp_min(eps)))


def _check_task(task: Any, examples: list[dict[str, Any]], source: str) -> None:
    if task.name == "sentence-embedding":
        column = task.settings.label_column
        unscored = next((i for i, e in enumerate(examples) if not column or e.get(column) is None), None)
        if unscored is not None:
            raise ValueError(
                f"{source or 'training data'} row {unscored + 1}: cv of a bi-encoder needs a score for every pair "
                f"(label_column {column!r}): its out-of-fold metrics are pearson and spearman against them"
            )


def run_cv(cargs: CvArgs, fargs: FinetuneArgs, targs: TrainArgs, train_data: Any = None, test_data: Any = None):
    """Cross-validate as described in the module docstring; returns a :class:`CvResult`.

    Under ``torchrun`` every fold is one distributed fine-tuning run of all the processes (see
    :func:`~bunmyaku.tasks.finetune.run_finetune`); process 0 alone holds the folder's lock and writes the
    results, and every process returns the same :class:`CvResult`.
    """
    dist_utils.join_from_env()  # under torchrun (the CLI has joined already; a script's first call joins)
    return _run_cv(cargs, fargs, targs, train_data, test_data)


def _run_cv(cargs: CvArgs, fargs: FinetuneArgs, targs: TrainArgs, train_data: Any, test_data: Any):
    if fargs.task not in SUPPORTED:
        raise ValueError(f"cv supports the tasks {list(SUPPORTED)}, not {fargs.task!r}")
    if fargs.eval is not None or fargs.eval_split or fargs.test_split:
        raise ValueError("cv holds each fold out as its eval set: give no eval, eval_split or test_split")
    if targs.output_dir is None:
        raise ValueError("give output_dir (--output-dir): cv writes every fold's run and the out-of-fold results")
    seeds = cargs.seed_list() if cargs.seeds is not None else [targs.seed]
    out = Path(targs.output_dir)
    task = build_task(fargs)
    kind = averaging.kind_of(task)
    data = train_data if train_data is not None else fargs.train
    if data is None:
        raise ValueError("give --train (the training file, or in-memory rows in Python)")
    examples, source = task.read_data(data)
    _check_task(task, examples, source)
    task.fit_labels(examples)
    labels = task.label_names()
    fold, kind_of_folds = assign_folds(task, examples, cargs, source)
    logger.info("%d examples in %d %s folds, seeds %s", len(examples), cargs.folds, kind_of_folds, seeds)

    record = {
        "cv": dataclasses.asdict(cargs),
        "seeds": seeds,
        "finetune": {k: v for k, v in _settings(fargs).items() if k not in ("train", "test")},
        "train": {k: v for k, v in dataclasses.asdict(targs).items() if k not in _NOT_COMPARED},
        "folds": fold,
    }
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:  # one cv run at a time in this folder (each fold locks its own)
        on_main(lambda: (stack.enter_context(exclusive_output_dir(out)), _claim(out, record, fargs.overwrite)))
        per_fold = dataclasses.replace(fargs, train=None, eval=None, test=None, overwrite=False)
        scores: list[Any] = [None] * len(examples)
        test_examples, test_source, test_runs, test_labelled = None, "", [], False
        test_given = test_data if test_data is not None else fargs.test
        if test_given is not None:
            test_examples, test_source = task.read_data(test_given, labelled=False)
            test_labelled = _labelled(task, test_examples)
        batch = fargs.eval_batch_size or targs.batch_size
        for k in range(cargs.folds):
            held = [i for i, f in enumerate(fold) if f == k]
            held_examples = [examples[i] for i in held]
            train_rows = [examples[i] for i, f in enumerate(fold) if f != k]
            seed_runs = []
            for seed in seeds:
                run_dir = out / f"fold{k}" if len(seeds) == 1 else out / f"fold{k}" / f"seed{seed}"
                # process 0's view of the folder: the processes must all train the fold or all skip it
                done, fresh = shared_from_main(
                    ((run_dir / "metrics.json").is_file(), run_dir.exists() and not (run_dir / "checkpoints").is_dir())
                )
                if done:
                    logger.info("fold %d seed %d: finished earlier in %s, skipped", k, seed, run_dir)
                else:
                    shown = (k, seed, len(train_rows), len(held))
                    logger.info("fold %d seed %d: training on %d, evaluating on %d", *shown)
                    run_finetune(
                        # a killed fold without checkpoints starts again
                        dataclasses.replace(per_fold, overwrite=fresh),
                        dataclasses.replace(targs, output_dir=str(run_dir), seed=seed),
                        Inputs(train=train_rows, eval=held_examples),
                    )
                fold_task, model, tokenizer = load_finetuned(run_dir, device=targs.device if targs.device else None)
                if fold_task.label_names() != labels:
                    raise ValueError(
                        f"{run_dir}: its labels {fold_task.label_names()} differ from the training data's {labels}; "
                        "every class needs examples in every fold's training part"
                    )
                seed_runs.append(_example_scores(fold_task, model, tokenizer, held_examples, source, batch, True))
                if test_examples is not None:
                    test_runs.append(
                        _example_scores(fold_task, model, tokenizer, test_examples, test_source, batch, False)
                    )
            for i, value in zip(held, averaging.average(kind, seed_runs), strict=True):
                scores[i] = value

        test_scores = averaging.average(kind, test_runs) if test_examples is not None else None
        written = (out, task, examples, source, fold, scores, test_examples, test_source, test_scores, test_labelled)
        result = on_main(_write, *written)  # process 0 writes; the others build the same result without writing
        return result if result is not None else _write(*written, write=False)


def _labelled(task: Any, examples: list[dict[str, Any]]) -> bool:
    """Whether test examples carry gold labels the task's metrics can use."""
    if task.name == "token-classification":
        return all((e.get("tags") if task.conll else e.get("_entities")) is not None for e in examples)
    if task.name == "question-answering":
        return any(e["qa"].answers for e in examples)
    column = task.settings.label_column
    return column is not None and all(e.get(column) is not None for e in examples)


def decode(
    task: Any, examples: list[dict[str, Any]], source: str, scores: list[Any], labelled: bool
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Averaged scores -> one record per example (the task's predictions.jsonl fields, and ``gold``) and the
    task's metrics (None when not ``labelled``)."""
    kind = averaging.kind_of(task)
    s = task.settings
    if kind == "tags":
        texts = None if task.conll else [str(e[s.text_column]) for e in examples]
        predicted = averaging.tag_predictions(scores, task.labels or [], texts)
        gold = [task.gold(e) for e in examples]
        records = []
        for e, p, g in zip(examples, predicted, gold, strict=True):
            shown = {"tokens": e["tokens"]} if task.conll else {"text": e[s.text_column]}
            records.append({**shown, **p, **({"gold": g} if labelled else {})})
        return records, averaging.tag_metrics(gold, predicted, scores, texts) if labelled else None
    if kind == "answers":
        predicted = averaging.answer_predictions(scores, s.null_threshold)
        gold = [task.gold(e) for e in examples]
        records = [
            {"id": e["qa"].id, "question": e["qa"].question, **p, **({"gold": g} if labelled else {})}
            for e, p, g in zip(examples, predicted, gold, strict=True)
        ]
        return records, averaging.answer_metrics(gold, predicted) if labelled else None
    if task.name == "sentence-embedding":
        records = [
            {"text": e[s.text_column], "text_pair": e[s.text_pair_column], "cosine": v}
            for e, v in zip(examples, scores, strict=True)
        ]
        if not labelled:
            return records, None
        gold = [float(e[s.label_column]) for e in examples]
        for record, g in zip(records, gold, strict=True):
            record["gold"] = g
        return records, {"pearson": pearson(gold, scores), "spearman": spearman(gold, scores)}
    logits = _to_logits(kind, torch.tensor(scores, dtype=torch.float64))
    features = [{"labels": task._target(e, source)} for e in examples] if labelled else [{}] * len(examples)
    records = task.predictions(examples, features, logits)
    if task.name == "multiple-choice":  # as classification: the chosen answer's probability
        for record, row in zip(records, scores, strict=True):
            record["score"] = row[record["label"]]
    return records, task.metrics(examples, features, logits) if labelled else None


_NOT_COMPARED = ("overwrite", "resume", "progress", "plot", "output_dir", "device", "num_threads", "seed")


def _claim(out: Path, record: dict[str, Any], overwrite: bool) -> None:
    """Refuse a folder holding another cv run (other settings or folds) unless overwrite, which clears it."""
    path = out / "cv.json"
    if overwrite:
        for child in out.iterdir():
            if child.name.startswith("fold") or child.name in (*CV_RESULTS, "cv.json"):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    elif path.is_file():
        before, now = json.loads(path.read_text(encoding="utf-8")), json.loads(json.dumps(record))
        if before != now:
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise ValueError(
                f"{out} holds a cv run with other settings ({', '.join(changed)}); rerun with the same settings to "
                "resume it, or pass --overwrite (overwrite=True) to start again"
            )
        return
    else:
        present = sorted(p.name for p in out.iterdir() if p.name.startswith("fold") or p.name in CV_RESULTS)
        if present:
            raise ValueError(
                f"{out} already holds {', '.join(present[:6])} but no cv.json; pass --overwrite or another --output-dir"
            )
    write_json_atomic(path, record, sort_keys=False)


def _write(
    out, task, examples, source, fold, scores, test_examples, test_source, test_scores, test_labelled, write=True
):
    records, metrics = decode(task, examples, source, scores, labelled=True)
    oof = [{**r, "row": i, "fold": fold[i], "scores": scores[i]} for i, r in enumerate(records)]
    per_fold = []
    for k in range(max(fold) + 1):
        held = [i for i, f in enumerate(fold) if f == k]
        _, values = decode(task, [examples[i] for i in held], source, [scores[i] for i in held], labelled=True)
        per_fold.append({"fold": k, "examples": len(held), **(values or {})})
    summary = fold_summary(per_fold)
    if write:
        write_jsonl_atomic(out / "oof.jsonl", oof)
        write_json_atomic(out / "fold_metrics.json", summary, sort_keys=False)
    result = CvResult(metrics=metrics or {}, fold_metrics=summary, oof=oof, output_dir=str(out))
    if test_examples is not None:
        predicted, test_metrics = decode(task, test_examples, test_source, test_scores, labelled=test_labelled)
        result.test_predictions = [{**p, "row": i, "scores": test_scores[i]} for i, p in enumerate(predicted)]
        if write:
            write_jsonl_atomic(out / "test_predictions.jsonl", result.test_predictions)
        if test_metrics is not None:
            result.test_metrics = test_metrics
            if write:
                write_json_atomic(out / "test_metrics.json", test_metrics, sort_keys=False)
    if write:
        write_json_atomic(out / "metrics.json", result.metrics, sort_keys=False)  # last: it marks a finished cv run
    return result


def cv(**options: Any) -> CvResult:
    """K-fold cross-validation: the Python twin of ``bunmyaku cv`` (the options of :func:`bunmyaku.finetune`
    plus ``folds``, ``fold_seed``, ``group_column``, ``seeds``); ``train`` / ``test`` may be in-memory rows.
    ``output_dir`` is required. Returns a :class:`CvResult`."""
    import os

    check_keywords("cv", options, cv.__signature__)  # type: ignore[attr-defined]
    values = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in options.items()}
    train = values.pop("train") if not isinstance(values.get("train"), (str, type(None))) else None
    test = values.pop("test") if not isinstance(values.get("test"), (str, type(None))) else None
    cargs, fargs, targs = build_args(OPTION_CLASSES, values)
    return run_cv(cargs, fargs, targs, train_data=train, test_data=test)


cv.__signature__ = keyword_signature(OPTION_CLASSES, CvResult)  # type: ignore[attr-defined]
