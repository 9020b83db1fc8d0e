"""What every fine-tuning task shares: the task interface, dynamic padding, length-grouped batches.

A task turns records read from a file into *examples*, examples into *features* (token ids as lists, one
feature per model row; a long QA context gives several), features into padded *batches*, and the model's
outputs back into metrics (:mod:`bunmyaku.tasks.metrics`) and predictions. The fine-tuning driver
(:mod:`bunmyaku.tasks.finetune`) only talks to this interface, so a new task family is one subclass.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from bunmyaku.data.loader import check_batch_size
from bunmyaku.data.tables import DataError, check_columns, from_memory, read_table, warn_empty_texts

logger = logging.getLogger(__name__)

Feature = dict[str, Any]
Batch = dict[str, torch.Tensor]
IGNORE_INDEX = -100
# keys a collated batch may hold that are not model inputs
BOOKKEEPING = ("index", "window_doc")  # window_doc: the document of each window (bunmyaku.tasks.windows)


class Task:
    """One task family: reading, encoding, collating, the loss, metrics and predictions.

    Args:
        settings: the fine-tuning settings (:class:`bunmyaku.tasks.finetune.FinetuneArgs`, or the dict saved
            with a fine-tuned model); a task reads the fields it needs.
    """

    name: ClassVar[str] = ""
    head: ClassVar[str] = "sequence-classification"  # the model task (bunmyaku.from_pretrained(task=...))
    metric: ClassVar[str] = "accuracy"  # what selects the best epoch (higher is better)

    def __init__(self, settings: Any):
        self.settings = settings
        self.labels: list[str] | None = None  # label names, fixed on the training data

    # ------------------------------------------------------------------------------ reading

    def columns(self, labelled: bool) -> list[str]:
        """The table columns this task reads (the label column only when ``labelled``)."""
        raise NotImplementedError

    def read(self, path: str | Path, labelled: bool = True) -> list[dict[str, Any]]:
        """Records from a table file, each column checked, labels too when ``labelled`` (``file:line`` errors);
        empty texts are warned about."""
        s = self.settings
        records = read_table(
            path,
            format=_table_format(s.format),
            columns=self.columns(labelled),
            header=s.header,
            texts=self.columns(labelled=False),
        )
        if labelled:
            self.check_labels(records, str(path))
        return records

    def read_data(self, data: Any, labelled: bool = True) -> tuple[list[dict[str, Any]], str]:
        """Records from a file path (str or Path) or in-memory data (a list of dicts, a pandas DataFrame, a
        ``datasets.Dataset``); returns them with the file's name for error messages ("" for in-memory rows,
        which errors name as ``row N``)."""
        if isinstance(data, (str, os.PathLike)):
            return self.read(data, labelled), str(data)
        return self.read_records(from_memory(data), labelled), ""

    def read_records(self, records: list[dict[str, Any]], labelled: bool = True) -> list[dict[str, Any]]:
        """In-memory records checked as :meth:`read` checks a file's (errors name ``row N``)."""
        check_columns(records, self.columns(labelled), "")
        warn_empty_texts(records, self.columns(labelled=False))
        if labelled:
            self.check_labels(records, "")
        return records

    def gold(self, example: dict[str, Any]) -> Any:
        """An example's gold label as the data gives it (the ``labels`` handed to ``compute_metrics``)."""
        return example.get(self.settings.label_column) if self.settings.label_column else None

    def check_labels(self, examples: list[dict[str, Any]], source: str) -> None:
        """Refuse a label the task cannot train on (a score that is not a finite number, ...), naming
        ``source:line``; labels that need the label set (classes) are checked when encoding."""

    def fit_labels(self, examples: list[dict[str, Any]]) -> None:
        """Fix the label set on the training examples (classification tasks)."""

    def split_groups(self, examples: list[dict[str, Any]]) -> list[Any]:
        """Per example, the group a held-out split must keep together (QA: the article); default: itself."""
        return list(range(len(examples)))

    def group_value(self, example: dict[str, Any], column: str) -> Any:
        """The value of ``column`` that keeps an example's group in one fold (``cv --group-column``); None when the
        example has no such column."""
        return example.get(column)

    # ------------------------------------------------------------------------------ model

    def num_labels(self) -> int | None:
        """Outputs of the head, or None when the head's size is fixed."""
        return len(self.labels) if self.labels else None

    def label_names(self) -> list[str] | None:
        """Names stored in the model config's id2label / label2id."""
        return self.labels

    def prepare_model(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        """Adjust a loaded model to the task (new special tokens, padding id); default: as it is."""
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad_id(tokenizer)  # GPT-2 reads the last real token by the padding id
        return model

    # ------------------------------------------------------------------------------ features

    def encode(
        self, tokenizer: Any, examples: list[dict[str, Any]], labelled: bool = True, source: str = ""
    ) -> list[Feature]:
        """Token ids (lists) for each model row; every feature holds ``example`` (the index of its example).

        ``source`` names the file in errors (a label unseen at training time, ...)."""
        raise NotImplementedError

    def collate(self, features: list[Feature], pad: int) -> Batch:
        """Pad the features of one batch to its longest row (dynamic padding)."""
        return collate_features(features, pad)

    def count(self, batch: Batch) -> int:
        """How many units the loss averages over (rows; tokens for tagging)."""
        return len(batch["index"])

    def forward(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The mean loss (None without labels) and per-row outputs, detached, for metrics and predictions."""
        out = model(**model_inputs(batch))
        return out.loss, out.logits.detach()

    # ------------------------------------------------------------------------------ results

    def metrics(self, examples: list[dict[str, Any]], features: list[Feature], outputs: list[Any]) -> dict[str, float]:
        """Task metrics with plain keys (``accuracy``, ``f1``, ``pearson``, ``spearman``, ``exact_match``)."""
        raise NotImplementedError

    def predictions(
        self, examples: list[dict[str, Any]], features: list[Feature], outputs: list[Any]
    ) -> list[dict[str, Any]]:
        """One JSON-serialisable record per example."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """What a saved model must remember to predict again (label names, ...)."""
        return {"labels": self.labels}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state`."""
        self.labels = state.get("labels")


def _table_format(fmt: str | None) -> str | None:
    return None if fmt in (None, "auto") else fmt


def pad_id(tokenizer: Any) -> int:
    """The id padding uses: the tokenizer's pad token, else its EOS (GPT-2), else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def model_inputs(batch: Batch) -> Batch:
    """The batch without bookkeeping keys."""
    return {k: v for k, v in batch.items() if k not in BOOKKEEPING}


# ------------------------------------------------------------------------------------------------
# Dynamic padding and length-grouped batches

PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}


def _pad(rows: list[list[int]], value: int, length: int) -> list[list[int]]:
    return [list(r) + [value] * (length - len(r)) for r in rows]


def collate_features(features: list[Feature], pad: int) -> Batch:
    """Stack features into tensors: lists of ids are padded to the batch's longest row, nested lists (choices)
    to (B, N, T); scalars become (B,). ``input_ids`` pad with ``pad``, labels with -100, masks with 0."""
    batch: Batch = {"index": torch.tensor([f["index"] for f in features])}
    for key in features[0]:
        if key in ("index", "example") or key.startswith("_"):
            continue
        values = [f[key] for f in features]
        value = PAD_VALUES.get(key.removeprefix("pair_"), pad)
        if isinstance(values[0], list) and values[0] and isinstance(values[0][0], list):  # (N, T) per feature
            length = max(len(r) for v in values for r in v)
            batch[key] = torch.tensor([_pad(v, value, length) for v in values])
        elif isinstance(values[0], list):
            length = max(len(v) for v in values)
            dtype = torch.float if values[0] and isinstance(values[0][0], float) else torch.long
            batch[key] = torch.tensor(_pad(values, value, length), dtype=dtype)
        else:
            batch[key] = torch.tensor(values)
    return batch


def feature_length(feature: Feature) -> int:
    """Tokens in a feature (all choices together for multiple choice, both sides for a bi-encoder)."""
    ids = feature["input_ids"]
    n = sum(len(r) for r in ids) if ids and isinstance(ids[0], list) else len(ids)
    return n + len(feature.get("pair_input_ids", ()))


class GroupedBatches:
    """Features grouped into batches of similar length; item ``i`` is one whole batch (a list of features).

    Padding is waste: sorting a whole epoch by length would make batches too uniform to train well, so
    training shuffles, cuts the order into mega-batches of ``50 * batch_size``, sorts each by length and cuts
    it into batches, then shuffles the batches (regrouped every epoch through :meth:`set_epoch`). Evaluation
    sorts everything by length; each feature keeps its ``index`` so outputs return to input order.

    Args:
        features: the encoded rows.
        batch_size: rows per batch.
        shuffle: training order (seeded by ``seed`` and the epoch) or the sorted evaluation order.
        seed: seeds the shuffles.
    """

    MEGA = 50

    def __init__(self, features: list[Feature], batch_size: int, shuffle: bool = False, seed: int = 0):
        if not features:
            raise DataError("no examples to batch")
        self.features = [{**f, "index": i} for i, f in enumerate(features)]
        self.lengths = np.array([feature_length(f) for f in features])
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        check_batch_size(batch_size)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Regroup for ``epoch`` (training order only)."""
        B = self.batch_size
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable")
            self.groups = [order[i : i + B] for i in range(0, len(order), B)]
            return
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.features))
        mega = B * self.MEGA
        groups = []
        for lo in range(0, len(order), mega):
            chunk = order[lo : lo + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            groups += [chunk[i : i + B] for i in range(0, len(chunk), B)]
        self.groups = [groups[i] for i in rng.permutation(len(groups))]

    def __len__(self) -> int:
        return math.ceil(len(self.features) / self.batch_size)

    def __getitem__(self, i: int) -> list[Feature]:
        return [self.features[j] for j in self.groups[i]]


class BatchPlan:
    """Ready training batches for the Trainer, epoch after epoch: length-grouped, padded, resumable at any batch.

    Epoch ``e`` is :class:`GroupedBatches`' grouping for ``e``. With ``world_size`` processes, ``groups`` holds
    *global* batches (``batch_size x world_size`` rows, pretraining's convention: ``batch_size`` is per process)
    and global step ``i`` takes group ``i``, process ``r`` its rows ``r, r + W, ...``: the rows of one length-
    sorted group, dealt out, so the processes' shares have similar lengths and together are exactly the batch
    one process with ``batch_size x W`` would take (the Trainer divides the loss by the global count). A group
    with fewer rows than processes (the last cut of a mega-batch) is skipped, so no process gets an empty batch.
    The position (epoch, batch) is all a checkpoint needs to continue the plan exactly.

    Args:
        groups: the training features in length-grouped global batches (``shuffle=True``).
        collate: ``collate(features)`` -> a padded batch.
        rank: this process's index; world: the number of processes.
    """

    def __init__(
        self, groups: GroupedBatches, collate: Callable[[list[Feature]], Batch], rank: int = 0, world: int = 1
    ):
        self.groups, self.collate = groups, collate
        self.rank, self.world_size = rank, world
        # group sizes do not depend on the epoch (only which rows fill them), so neither does this count
        self.batches_per_epoch = sum(len(g) >= world for g in groups.groups)
        if self.batches_per_epoch == 0:
            raise DataError(f"{len(groups.features)} training rows are fewer than one per process ({world} processes)")
        self.epoch = 0
        self.position = 0
        self._grouped: int | None = None  # the epoch ``groups`` is grouped for
        self._usable: list[int] = []

    def next_batch(self) -> Batch:
        """The next batch of this process, moving to a new epoch when this one is used up."""
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        if self._grouped != self.epoch:
            self.groups.set_epoch(self.epoch)
            self._grouped = self.epoch
            self._usable = [i for i, g in enumerate(self.groups.groups) if len(g) >= self.world_size]
        group = self.groups[self._usable[self.position]]
        self.position += 1
        return self.collate(group[self.rank :: self.world_size])

    def state_dict(self) -> dict[str, int]:
        """The plan's position."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by :meth:`state_dict`."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
