"""Readers for labelled data: every format, real files, and errors that name the file and line."""

from __future__ import annotations

import json

import pytest

from bunmyaku.data.tables import (
    DataError,
    LabelMap,
    from_dataset,
    read_conll,
    read_squad,
    read_table,
)
from tests.conftest import require_module


def test_agnews_tsv_without_header_and_with_quotes(shared_data):
    records = read_table(shared_data / "agnews" / "dev.tsv", columns=["0", "1"])
    assert len(records) == 10_001  # the data README rounds to 10,000
    assert {r["1"] for r in records} == {"World", "Sports", "Business", "Sci/Tech"}
    assert any('"' in r["0"] for r in records)  # quotes are text in TSV, never field delimiters


def test_jsonl_and_squad_on_real_data(shared_data):
    jsts = read_table(shared_data / "jglue" / "jsts" / "valid.jsonl", columns=["sentence1", "sentence2", "label"])
    assert len(jsts) == 1457 and isinstance(jsts[0]["label"], float)
    squad = read_squad(shared_data / "jglue" / "jsquad" / "valid.json")
    assert len(squad) == 4442
    example = squad[0]
    a = example.answers[0]
    assert example.context[a["answer_start"] : a["answer_start"] + len(a["text"])] == a["text"]


def test_csv_parquet_json_and_datasets(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"hello, world",pos\n"say ""hi""",neg\n', encoding="utf-8")
    rows = read_table(tmp_path / "a.csv", columns=["text", "label"])
    assert [r["text"] for r in rows] == ["hello, world", 'say "hi"'] and rows[1]["_line"] == 3
    pa = require_module("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), tmp_path / "a.parquet")
    assert [r["label"] for r in read_table(tmp_path / "a.parquet", columns=["label"])] == [0, 1]
    (tmp_path / "a.json").write_text(json.dumps([{"text": "x", "label": 1}]), encoding="utf-8")
    assert read_table(tmp_path / "a.json")[0]["text"] == "x"
    datasets = require_module("datasets")
    ds = datasets.Dataset.from_dict({"text": ["p", "q"], "label": [1, 0]})
    assert [r["text"] for r in from_dataset(ds)] == ["p", "q"]


def test_conll_bio_and_iob1(tmp_path):
    (tmp_path / "a.conll").write_text(
        "-DOCSTART- -X- O O\n\nEU NNP I-ORG\nrejects VBZ O\nGerman JJ I-MISC\n\nPeter NNP I-PER\nBlackburn NNP I-PER\n",
        encoding="utf-8",
    )
    sentences = read_conll(tmp_path / "a.conll", scheme="iob1")
    assert sentences[0]["tags"] == ["B-ORG", "O", "B-MISC"] and sentences[1]["tags"] == ["B-PER", "I-PER"]
    assert sentences[1]["_line"] == 7


def test_errors_name_file_and_line(tmp_path):
    (tmp_path / "ragged.tsv").write_text("a\tWorld\nb\tSports\textra\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"ragged.tsv:2: expected 2 fields \(as on line 1\), got 3"):
        read_table(tmp_path / "ragged.tsv", columns=["0", "1"])
    (tmp_path / "empty.tsv").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty.tsv is empty"):
        read_table(tmp_path / "empty.tsv")
    (tmp_path / "a.jsonl").write_text('{"text": "x", "label": 1}\n{"text": "y"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a.jsonl:2: missing column\(s\) \['label'\]"):
        read_table(tmp_path / "a.jsonl", columns=["text", "label"])
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match="b.jsonl:2: invalid JSON"):
        read_table(tmp_path / "b.jsonl")
    (tmp_path / "c.conll").write_text("EU B-ORG\nrejects X O\n", encoding="utf-8")
    with pytest.raises(DataError, match="c.conll:2: expected 2 columns"):
        read_conll(tmp_path / "c.conll")
    with pytest.raises(FileNotFoundError, match="missing.csv does not exist"):
        read_table(tmp_path / "missing.csv")
    labels = LabelMap.fit(["World", "Sports"])
    with pytest.raises(DataError, match=r"test.tsv:7: label 'Cars' was not seen in the training data"):
        labels.encode("Cars", where="test.tsv:7")
