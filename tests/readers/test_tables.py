"""Readers for labelled data: every format, real files, and errors that name the file and line."""

from __future__ import annotations

import json
import logging

import pytest

from bunmyaku.data.tables import (
    DataError,
    LabelMap,
    finite_number,
    from_memory,
    iter_jsonl,
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
    assert [(r["text"], r["label"]) for r in from_memory(ds)] == [("p", 1), ("q", 0)]  # plain ints stay ints
    # a ClassLabel column holds ids; the records speak its names (what the model's id2label will say); -1 = none
    named = datasets.Dataset.from_dict({"text": ["p", "q", "r"], "label": [1, 0, -1]})
    named = named.cast_column("label", datasets.ClassLabel(names=["World", "Sports"]))
    assert [r["label"] for r in from_memory(named)] == ["Sports", "World", None]


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


# ------------------------------------------------------------------------------------------------
# Input that used to be read silently wrong


def test_duplicate_header_is_refused(tmp_path):
    (tmp_path / "dup.csv").write_text("text,text,label\na,b,pos\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"dup.csv:1: the header names column\(s\) \['text'\] more than once"):
        read_table(tmp_path / "dup.csv", columns=["text", "label"])
    (tmp_path / "dup.tsv").write_text("text\tlabel\tlabel\na\tx\ty\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"dup.tsv:1: .*\['label'\]"):
        read_table(tmp_path / "dup.tsv", columns=["text", "label"])
    (tmp_path / "pos.tsv").write_text("a\ta\n", encoding="utf-8")  # positions: equal values are data, not names
    assert read_table(tmp_path / "pos.tsv", columns=["0", "1"])[0] == {"0": "a", "1": "a", "_line": 1}


def test_labels_equal_after_stripping_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="bunmyaku.data.tables"):
        labels = LabelMap.fit(["World", "World ", "Sports", " Sports", "Business"])
    assert labels.names == [" Sports", "Business", "Sports", "World", "World "]  # kept apart, as the data says
    assert "'World' / 'World '" in caplog.text and "' Sports' / 'Sports'" in caplog.text
    assert "Business" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bunmyaku.data.tables"):
        LabelMap.fit(["World", "Sports"])
    assert not caplog.text


@pytest.mark.parametrize(
    ("name", "content", "columns"),
    [
        ("bom.csv", "text,label\nhello,pos\n", ["text", "label"]),
        ("bom.tsv", "text\tlabel\nhello\tpos\n", ["text", "label"]),
        ("bom.jsonl", '{"text": "hello", "label": "pos"}\n', ["text", "label"]),
        ("bom.json", '[{"text": "hello", "label": "pos"}]', ["text", "label"]),
    ],
)
def test_byte_order_mark_is_not_part_of_the_first_column(tmp_path, name, content, columns):
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + content.encode("utf-8"))  # as Excel writes UTF-8
    (record,) = read_table(tmp_path / name, columns=columns)
    assert record["text"] == "hello" and record["label"] == "pos"


def test_byte_order_mark_in_headerless_tsv_conll_and_squad(tmp_path):
    (tmp_path / "a.tsv").write_bytes(b"\xef\xbb\xbfhello\tpos\n")
    assert read_table(tmp_path / "a.tsv", columns=["0", "1"])[0]["0"] == "hello"
    (tmp_path / "a.conll").write_bytes(b"\xef\xbb\xbfEU B-ORG\nrejects O\n")
    assert read_conll(tmp_path / "a.conll")[0]["tokens"] == ["EU", "rejects"]
    squad = {"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "1", "question": "q", "answers": []}]}]}]}
    (tmp_path / "s.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(squad).encode())
    assert read_squad(tmp_path / "s.json")[0].question == "q"


def test_empty_texts_are_counted_with_their_lines(tmp_path, caplog):
    rows = ["a b\tpos", "\tneg", "c\tpos", "  \tneg", "d\tpos", "\tneg", "\tpos", "\tneg", "\tpos", "\tneg"]
    (tmp_path / "e.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="bunmyaku.data.tables"):
        records = read_table(tmp_path / "e.tsv", columns=["0", "1"], texts=["0"])
    assert len(records) == 10
    assert "7 of 10 records in " in caplog.text and "e.tsv have an empty '0' (lines 2, 4, 6, 7, 8, ...)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bunmyaku.data.tables"):
        read_table(tmp_path / "e.tsv", columns=["0", "1"], texts=["1"])  # no label is empty
    assert not caplog.text


def test_empty_texts_warned_when_a_task_reads(tmp_path, caplog):
    from bunmyaku.tasks.finetune import FinetuneArgs, build_task

    (tmp_path / "p.jsonl").write_text('{"a": "x", "b": "", "label": "y"}\n{"a": "", "b": "", "label": "n"}\n')
    task = build_task(FinetuneArgs(text_column="a", text_pair_column="b"))
    with caplog.at_level(logging.WARNING, logger="bunmyaku.data.tables"):
        task.read(tmp_path / "p.jsonl")
    assert "p.jsonl have an empty 'a' (lines 2)" in caplog.text and "1 of 2 records in" in caplog.text
    assert "p.jsonl have an empty 'b' (lines 1, 2)" in caplog.text


def test_fields_longer_than_csv_default_limit(tmp_path):
    long_text = "word " * 40_000  # 200,000 characters; csv's default limit is 131,072
    (tmp_path / "long.tsv").write_text(f"{long_text}\tpos\nshort\tneg\n", encoding="utf-8")
    records = read_table(tmp_path / "long.tsv", columns=["0", "1"])
    assert records[0]["0"] == long_text and records[1]["1"] == "neg"
    (tmp_path / "long.csv").write_text(f'text,label\n"{long_text}",pos\n', encoding="utf-8")
    assert read_table(tmp_path / "long.csv", columns=["text"])[0]["text"] == long_text


# ------------------------------------------------------------------------------------------------
# One JSONL reader, one error type; numbers; SQuAD fields


def test_iter_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "a"}\n\n{"text": "b"}\n')
    assert list(iter_jsonl(path)) == [(1, {"text": "a"}), (3, {"text": "b"})]
    for content, message in [
        (b'{"text": "a"}\n{"text": \n', r"c.jsonl:2: invalid JSON"),
        (b'{"text": "a"}\n[1, 2]\n', r"c.jsonl:2: expected a JSON object, got list"),
        (b'{"text": "a"}\n{"text": "\xff"}\n', r"c.jsonl:2: not valid UTF-8 at byte offset 24: b'\\xff'"),
    ]:
        path.write_bytes(content)
        with pytest.raises(DataError, match=message):
            list(iter_jsonl(path))
    with pytest.raises(FileNotFoundError, match="nothing.jsonl does not exist"):
        list(iter_jsonl(tmp_path / "nothing.jsonl"))
    (tmp_path / "latin1.conll").write_bytes("EU B-ORG\ncaf\u00e9 O\n".encode("latin-1"))  # a traceback before
    with pytest.raises(DataError, match=r"latin1.conll:2: not valid UTF-8 at byte offset 12"):
        read_conll(tmp_path / "latin1.conll")


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity", float("nan"), float("inf")])
def test_finite_number_refuses_nan_and_infinity(value):
    with pytest.raises(DataError, match=r"d.tsv:3: label .* is not a finite number"):
        finite_number(value, "d.tsv:3")


def test_finite_number_reads_numbers_and_refuses_the_rest():
    assert finite_number("2.5", "x") == 2.5 and finite_number(3, "x") == 3.0
    for value in ["high", None, True, [1.0]]:
        with pytest.raises(DataError, match=r"row 4: score .* is not a number"):
            finite_number(value, "row 4", "score")


def test_squad_missing_fields_name_the_question(tmp_path):
    def write(qa, context="Taro lives in Tokyo."):
        data = {"data": [{"paragraphs": [{"context": context, "qas": [qa]}]}, {"paragraphs": []}]}
        (tmp_path / "s.json").write_text(json.dumps(data), encoding="utf-8")
        return tmp_path / "s.json"

    with pytest.raises(DataError, match=r"s.json: question q1: no 'question' field"):
        read_squad(write({"id": "q1", "answers": []}))
    with pytest.raises(DataError, match=r"question q2: an answer: no 'text' field"):
        read_squad(write({"id": "q2", "question": "who?", "answers": [{"answer_start": 0}]}))
    with pytest.raises(DataError, match=r"question q3: answer 'Taro' is not at its answer_start 3"):
        read_squad(write({"id": "q3", "question": "who?", "answers": [{"text": "Taro", "answer_start": 3}]}))
    with pytest.raises(DataError, match=r"data\[0\].paragraphs\[0\].qas\[0\]: no 'id' field"):
        read_squad(write({"question": "who?"}))
    (example,) = read_squad(write({"id": 7, "question": "who?", "answers": [{"text": "Taro", "answer_start": "0"}]}))
    assert example.id == "7" and example.answers == [{"text": "Taro", "answer_start": 0}] and example.article == 0


def test_squad_examples_carry_their_article(tmp_path):
    articles = [
        {"paragraphs": [{"context": f"c{a}{p}", "qas": [{"id": f"{a}{p}", "question": "q"}]} for p in range(2)]}
        for a in range(3)
    ]
    (tmp_path / "s.json").write_text(json.dumps({"data": articles}), encoding="utf-8")
    assert [(e.id, e.article) for e in read_squad(tmp_path / "s.json")] == [
        ("00", 0),
        ("01", 0),
        ("10", 1),
        ("11", 1),
        ("20", 2),
        ("21", 2),
    ]
