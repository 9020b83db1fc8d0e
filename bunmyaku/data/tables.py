"""Labelled data for fine-tuning: CSV, TSV, JSONL, Parquet, Hugging Face ``datasets``, CoNLL and SQuAD JSON.

Every reader returns a list of plain dicts (``records``) and names the file and line of anything wrong
with the input. TSV is read without quote handling (a ``"`` in a text is just a character), which is
what TSV files in the wild expect; CSV follows RFC 4180.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LINE = "_line"  # each record remembers where it came from, for error messages


class DataError(ValueError):
    """Input data that cannot be used as given; the message names the file and line."""


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")


def _open_text(path: Path):
    return path.open(encoding="utf-8", newline="")


def _delimited(path: Path, delimiter: str, header: bool | None, columns: list[str]) -> list[dict[str, Any]]:
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with _open_text(path) as f:
        try:
            rows = list(csv.reader(f, delimiter=delimiter, quoting=quoting))
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot parse ({e})") from e
    rows_with_lines = [(i, r) for i, r in enumerate(rows, start=1) if r]
    if not rows_with_lines:
        raise DataError(f"{path} has no rows")
    if header is None:  # a header unless every requested column is a position
        header = not (columns and all(c.isdigit() for c in columns))
    first_line, first = rows_with_lines[0]
    names = first if header else [str(i) for i in range(len(first))]
    body = rows_with_lines[1:] if header else rows_with_lines
    records = []
    for line, row in body:
        if len(row) != len(names):
            raise DataError(f"{path}:{line}: expected {len(names)} fields (as on line {first_line}), got {len(row)}")
        record: dict[str, Any] = dict(zip(names, row, strict=True))
        record[LINE] = line
        records.append(record)
    if not records:
        raise DataError(f"{path} has a header but no data rows")
    return records


def _jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with _open_text(path) as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line}: invalid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line}: expected a JSON object, got {type(record).__name__}")
            record[LINE] = line
            records.append(record)
    if not records:
        raise DataError(f"{path} has no records")
    return records


def _json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if isinstance(data, dict) and "data" in data:
        raise DataError(f"{path} looks like SQuAD JSON: read it with format='squad'")
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects")
    return [{**r, LINE: i} for i, r in enumerate(data, start=1)]


def _parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading Parquet needs pyarrow: pip install 'bunmyaku[train]'") from e
    rows = pq.read_table(path).to_pylist()
    if not rows:
        raise DataError(f"{path} has no rows")
    return [{**r, LINE: i} for i, r in enumerate(rows, start=1)]


def from_dataset(dataset: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records from a Hugging Face ``datasets.Dataset`` (or any iterable of dicts); line = row number."""
    records = [{**row, LINE: i} for i, row in enumerate(dataset, start=1)]
    if not records:
        raise DataError("the dataset has no rows")
    return records


FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


def read_table(
    path: str | os.PathLike,
    format: str | None = None,
    columns: list[str] | None = None,
    header: bool | None = None,
) -> list[dict[str, Any]]:
    """Read a table of labelled examples.

    Args:
        path: the file.
        format: "csv", "tsv", "jsonl", "json" or "parquet"; default from the suffix.
        columns: the columns the caller needs; each must exist (by name, or by position "0", "1" ... in a
            headerless TSV / CSV).
        header: whether a CSV / TSV has a header row; default: yes, unless every requested column is a position.

    Returns:
        One dict per row, with the row's line number under ``"_line"``.

    Raises:
        FileNotFoundError, DataError: naming the file and, where it applies, the line.
    """
    path = Path(path)
    _check_file(path)
    format = format or FORMATS.get(path.suffix.lower())
    if format in ("csv", "tsv"):
        records = _delimited(path, "," if format == "csv" else "\t", header, list(columns or []))
    elif format == "jsonl":
        records = _jsonl(path)
    elif format == "json":
        records = _json(path)
    elif format == "parquet":
        records = _parquet(path)
    else:
        raise DataError(f"{path}: unknown format {format!r}; expected one of csv, tsv, jsonl, json, parquet")
    check_columns(records, columns or [], str(path))
    return records


def check_columns(records: list[dict[str, Any]], columns: list[str], source: str) -> None:
    """Raise naming the first record (file:line) that lacks a required column."""
    for record in records:
        missing = [c for c in columns if c not in record or record[c] is None]
        if missing:
            available = sorted(k for k in record if k != LINE)
            raise DataError(f"{source}:{record.get(LINE, '?')}: missing column(s) {missing}; available: {available}")


class LabelMap:
    """Label names <-> ids, fixed on the training data and stored in the model's config (id2label / label2id)."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.ids = {name: i for i, name in enumerate(self.names)}

    @classmethod
    def fit(cls, labels: Iterable[Any]) -> LabelMap:
        """The sorted set of labels seen (as strings)."""
        return cls(sorted({str(label) for label in labels}))

    def encode(self, label: Any, where: str = "") -> int:
        """The id of a label; an unseen label is an error naming where it appeared."""
        key = str(label)
        if key not in self.ids:
            raise DataError(f"{where}: label {key!r} was not seen in the training data (known: {self.names})")
        return self.ids[key]

    def __len__(self) -> int:
        return len(self.names)


# ------------------------------------------------------------------------------------------------
# CoNLL and SQuAD


def iob1_to_bio(tags: list[str]) -> list[str]:
    """IOB1 (``I-`` starts an entity unless it continues one of the same type; ``B-`` only between
    two adjacent entities of one type) to BIO (every entity starts with ``B-``)."""
    out, prev = [], "O"
    for tag in tags:
        if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        prev = tag
    return out


@dataclass
class QAExample:
    """One question on one context; ``answers`` are ``{"text", "answer_start"}`` (character offset)."""

    id: str
    question: str
    context: str
    answers: list[dict[str, Any]] = field(default_factory=list)
    is_impossible: bool = False


def read_conll(
    path: str | os.PathLike, token_column: int = 0, tag_column: int = -1, scheme: str = "bio"
) -> list[dict[str, Any]]:
    """CoNLL column files: one token per line, a blank line between sentences, ``-DOCSTART-`` skipped.

    Args:
        scheme: "bio" (kept as is) or "iob1" (converted to BIO).

    Returns:
        ``{"tokens": [...], "tags": [...], "_line": first line}`` per sentence.
    """
    path = Path(path)
    _check_file(path)
    if scheme not in ("bio", "iob1"):
        raise DataError(f"unknown tag scheme {scheme!r}; expected 'bio' or 'iob1'")
    sentences, tokens, tags, start, width = [], [], [], None, None
    with _open_text(path) as f:
        for line, text in enumerate(f, start=1):
            fields = text.split()
            if not fields or fields[0] == "-DOCSTART-":
                if tokens:
                    sentences.append({"tokens": tokens, "tags": tags, LINE: start})
                tokens, tags, start = [], [], None
                continue
            if width is None:
                width = len(fields)
            if len(fields) != width:
                raise DataError(f"{path}:{line}: expected {width} columns (as on the first line), got {len(fields)}")
            tag = fields[tag_column]
            if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
                raise DataError(f"{path}:{line}: tag {tag!r} is not O, B-TYPE or I-TYPE")
            tokens.append(fields[token_column])
            tags.append(tag)
            start = start or line
    if tokens:
        sentences.append({"tokens": tokens, "tags": tags, LINE: start})
    if not sentences:
        raise DataError(f"{path} has no sentences")
    if scheme == "iob1":
        for s in sentences:
            s["tags"] = iob1_to_bio(s["tags"])
    return sentences


def read_squad(path: str | os.PathLike):
    """SQuAD 1.1 / 2.0 JSON (``data[].paragraphs[].qas[]``) -> a list of ``QAExample``."""
    path = Path(path)
    _check_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: expected SQuAD JSON with a top-level 'data' list ({e})") from e
    examples = []
    for article in data:
        for paragraph in article.get("paragraphs", []):
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                answers = [{"text": a["text"], "answer_start": int(a["answer_start"])} for a in qa.get("answers", [])]
                for a in answers:
                    if context[a["answer_start"] : a["answer_start"] + len(a["text"])] != a["text"]:
                        raise DataError(f"{path}: question {qa['id']}: answer {a['text']!r} is not at its answer_start")
                examples.append(
                    QAExample(
                        id=str(qa["id"]),
                        question=qa["question"],
                        context=context,
                        answers=answers,
                        is_impossible=bool(qa.get("is_impossible", False)) or not answers,
                    )
                )
    if not examples:
        raise DataError(f"{path} has no questions")
    return examples
