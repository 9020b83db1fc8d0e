"""Labelled data for fine-tuning: CSV, TSV, JSONL, Parquet, Hugging Face ``datasets``, CoNLL and SQuAD JSON.

Every reader returns a list of plain dicts (``records``) and names the file and line of anything wrong
with the input. TSV is read without quote handling (a ``"`` in a text is just a character), which is
what TSV files in the wild expect; CSV follows RFC 4180. Files are UTF-8, with or without the byte order
mark spreadsheet programs write. Input that would be read silently wrong is refused (a header naming one
column twice) or warned about (empty texts, labels that differ only in surrounding whitespace).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LINE = "_line"  # each record remembers where it came from, for error messages
# csv's default field limit (131,072 characters) refuses long documents; a field may be as long as a file
FIELD_SIZE_LIMIT = 2**31 - 1
SHOWN = 5  # line numbers quoted in a warning


class DataError(ValueError):
    """Input data that cannot be used as given; the message names the file and line."""


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")


def _open_text(path: Path):
    return path.open(encoding="utf-8-sig", newline="")  # utf-8-sig: drop a byte order mark (Excel writes one)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e


def _delimited(path: Path, delimiter: str, header: bool | None, columns: list[str]) -> list[dict[str, Any]]:
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    csv.field_size_limit(max(csv.field_size_limit(), FIELD_SIZE_LIMIT))
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
    if header:
        _check_header(first, f"{path}:{first_line}")
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


def _check_header(names: list[str], where: str) -> None:
    """A column named twice would be read as its last occurrence only: refuse it."""
    seen: set[str] = set()
    repeated = [n for n in names if n in seen or seen.add(n)]
    if repeated:
        raise DataError(f"{where}: the header names column(s) {sorted(set(repeated))} more than once: {names}")


def utf8_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Stream a text file's lines: (1-based line number, line without its newline), decoded strictly as UTF-8
    (a byte order mark dropped). Lines end at ``\n`` only, never at the other characters ``str.splitlines``
    cuts at (U+2028 inside a text is text).

    Raises:
        DataError: a line that is not UTF-8, naming the file, the line and the byte offset.
    """
    path = Path(path)
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = raw[e.start : e.end]
                raise DataError(
                    f"{path}:{number}: not valid UTF-8 at byte offset {offset + e.start}: {bad!r}"
                ) from None
            offset += len(raw)
            if number == 1:
                line = line.removeprefix("\ufeff")
            yield number, line.rstrip("\r\n")


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream a JSON Lines file: (1-based line number, object) per non-blank line.

    This is the one JSONL reader: tables and corpora read through it, so bad input fails the same way.

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: a line that is not UTF-8, not JSON, or not a JSON object, naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    for number, text in utf8_lines(path):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def _jsonl(path: Path) -> list[dict[str, Any]]:
    records = [{**record, LINE: line} for line, record in iter_jsonl(path)]
    if not records:
        raise DataError(f"{path} has no records")
    return records


def _json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(_read_text(path))
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


IN_MEMORY = "in-memory data"


def from_memory(data: Any) -> list[dict[str, Any]]:
    """Records from in-memory data: a list of dicts, a pandas DataFrame, or a ``datasets.Dataset`` (one split of a
    ``DatasetDict``); each record's line is its row number (1-based). Missing DataFrame cells become None.

    Raises:
        DataError: no rows, a row that is not a mapping of column names to values, or a whole ``DatasetDict``.
    """
    if isinstance(data, (str, bytes)) or isinstance(data, os.PathLike):
        raise TypeError("from_memory takes in-memory data; read files with read_table")
    if type(data).__name__ == "DatasetDict" or (
        isinstance(data, dict) and data and all(hasattr(v, "column_names") for v in data.values())
    ):
        splits = ", ".join(map(str, data))
        raise DataError(f"a DatasetDict holds splits ({splits}): pass one of them, e.g. data['train']")
    if hasattr(data, "to_dict") and hasattr(data, "columns") and hasattr(data, "notna"):  # a pandas DataFrame
        data = data.astype(object).where(data.notna(), None).to_dict("records")
    if isinstance(data, dict):
        raise DataError("in-memory data must be rows (a list of dicts, a DataFrame or a Dataset), got one dict")
    class_names = _class_label_names(data)
    records = []
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(f"row {i}: expected a mapping of column names to values, got {type(row).__name__}")
        for column, names in class_names.items():
            value = row.get(column)
            if isinstance(value, int) and not isinstance(value, bool):
                row = {**row, column: names[value] if value >= 0 else None}  # -1: datasets' "no label"
        records.append({**row, LINE: i})
    if not records:
        raise DataError("the in-memory data has no rows")
    return records


def _class_label_names(data: Any) -> dict[str, list[str]]:
    """A ``datasets.Dataset``'s ClassLabel columns and their names: the rows hold class ids, the model and every
    output should speak the names (``World``, not ``0``)."""
    features = getattr(data, "features", None)
    if not isinstance(features, dict):
        return {}
    return {column: list(f.names) for column, f in features.items() if isinstance(getattr(f, "names", None), list)}


FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


def read_table(
    path: str | os.PathLike,
    format: str | None = None,
    columns: list[str] | None = None,
    header: bool | None = None,
    texts: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Read a table of labelled examples.

    Args:
        path: the file.
        format: "csv", "tsv", "jsonl", "json" or "parquet"; default from the suffix.
        columns: the columns the caller needs; each must exist (by name, or by position "0", "1" ... in a
            headerless TSV / CSV).
        header: whether a CSV / TSV has a header row; default: yes, unless every requested column is a position.
        texts: the columns holding texts: empty ones are counted and warned about.

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
    warn_empty_texts(records, texts or [], str(path))
    return records


def check_columns(records: list[dict[str, Any]], columns: list[str], source: str) -> None:
    """Raise naming the first record (file:line) that lacks a required column."""
    for record in records:
        missing = [c for c in columns if c not in record or record[c] is None]
        if missing:
            available = sorted(k for k in record if k != LINE)
            raise DataError(f"{where(record, source)}: missing column(s) {missing}; available: {available}")


def where(record: dict[str, Any], source: str = "") -> str:
    """``file:line`` of a record for error messages (``row N`` for in-memory data without a file)."""
    line = record.get(LINE, "?")
    return f"{source}:{line}" if source else f"row {line}"


def warn_empty_texts(records: list[dict[str, Any]], columns: list[str], source: str = "") -> None:
    """Warn, per column, how many records have an empty (or blank) text and on which lines the first ones are."""
    for column in columns:
        empty = [r for r in records if column in r and not str(r[column] if r[column] is not None else "").strip()]
        if empty:
            lines = ", ".join(str(r.get(LINE, "?")) for r in empty[:SHOWN]) + (", ..." if len(empty) > SHOWN else "")
            logger.warning(
                "%d of %d records%s have an empty %r (%s %s); they are used as empty inputs",
                len(empty),
                len(records),
                f" in {source}" if source else "",
                column,
                "lines" if source else "rows",
                lines,
            )


def finite_number(value: Any, at: str, what: str = "label") -> float:
    """``value`` as a float; a value that is not a number, or is NaN or infinite, is an error naming ``at``."""
    try:
        if isinstance(value, bool):
            raise TypeError(value)
        number = float(value)
    except (TypeError, ValueError) as e:
        raise DataError(f"{at}: {what} {value!r} is not a number") from e
    if not math.isfinite(number):
        raise DataError(f"{at}: {what} {value!r} is not a finite number (NaN and infinity cannot be trained on)")
    return number


class LabelMap:
    """Label names <-> ids, fixed on the training data and stored in the model's config (id2label / label2id)."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.ids = {name: i for i, name in enumerate(self.names)}

    @classmethod
    def fit(cls, labels: Iterable[Any]) -> LabelMap:
        """The sorted set of labels seen (as strings); labels equal but for surrounding whitespace are warned about
        (``"World"`` and ``"World "`` are two classes, which is rarely what the data meant)."""
        names = sorted({str(label) for label in labels})
        variants: dict[str, list[str]] = {}
        for name in names:
            variants.setdefault(name.strip(), []).append(name)
        clashes = [group for group in variants.values() if len(group) > 1]
        if clashes:
            logger.warning(
                "labels that differ only in surrounding whitespace are trained as different classes: %s; "
                "strip them in the data if each group is one class",
                "; ".join(" / ".join(repr(n) for n in group) for group in clashes),
            )
        return cls(names)

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
    article: int = 0  # index of its article in the file: held-out splits keep an article's questions together


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
    for line, text in utf8_lines(path):
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


def read_squad(path: str | os.PathLike) -> list[QAExample]:
    """SQuAD 1.1 / 2.0 JSON (``data[].paragraphs[].qas[]``) -> a list of ``QAExample``.

    Raises:
        DataError: a file that is not SQuAD JSON, or a question or answer lacking a field, naming where.
    """
    path = Path(path)
    _check_file(path)
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{path}: expected SQuAD JSON with a top-level 'data' list")
    examples = []
    for a, article in enumerate(data["data"]):
        for p, paragraph in enumerate(_field(article, "paragraphs", list, f"{path}: data[{a}]")):
            at = f"{path}: data[{a}].paragraphs[{p}]"
            context = _field(paragraph, "context", str, at)
            for q, qa in enumerate(_field(paragraph, "qas", list, at)):
                qid = str(_field(qa, "id", (str, int), f"{at}.qas[{q}]"))
                at_q = f"{path}: question {qid}"
                question = _field(qa, "question", str, at_q)
                answers = []
                for answer in qa.get("answers", []) if isinstance(qa, dict) else []:
                    text = _field(answer, "text", str, f"{at_q}: an answer")
                    start = _field(answer, "answer_start", (int, str), f"{at_q}: answer {text!r}")
                    if not str(start).isdigit():
                        raise DataError(f"{at_q}: answer {text!r}: answer_start {start!r} is not a character offset")
                    start = int(start)
                    if context[start : start + len(text)] != text:
                        raise DataError(f"{at_q}: answer {text!r} is not at its answer_start {start}")
                    answers.append({"text": text, "answer_start": start})
                impossible = bool(qa.get("is_impossible", False)) or not answers
                examples.append(QAExample(qid, question, context, answers, impossible, article=a))
    if not examples:
        raise DataError(f"{path} has no questions")
    return examples


def _field(obj: Any, key: str, kind: type | tuple[type, ...], at: str) -> Any:
    """``obj[key]``, checked to be a ``kind``; a missing or mistyped field is an error naming ``at``."""
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{at}: no {key!r} field")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(f"{at}: {key!r} must be {expected}, got {type(value).__name__}")
    return value
