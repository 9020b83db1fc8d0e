"""NER spans round-trip characters -> tokens -> characters, in Japanese through MeCab + WordPiece offsets."""

from __future__ import annotations

import json

import pytest

import bunmyaku
from bunmyaku.data.tables import iob1_to_bio
from bunmyaku.tasks.metrics import entity_f1
from bunmyaku.tasks.ner import spans_to_token_tags, token_tags_to_spans


def _offsets(enc, i=0):
    pairs = zip(enc["offset_mapping"][i].tolist(), enc.sequence_ids(i), strict=True)
    return [tuple(o) if s is not None else None for o, s in pairs]


def test_english_round_trip(minilm_dir):
    tokenizer = bunmyaku.Tokenizer.from_pretrained(minilm_dir)
    text = "Angela Merkel visited Tokyo in 2019 with Siemens AG."
    entities = [
        {"start": 0, "end": 13, "type": "PER"},
        {"start": 22, "end": 27, "type": "LOC"},
        {"start": 41, "end": 51, "type": "ORG"},
    ]
    enc = tokenizer(text, return_offsets_mapping=True)
    offsets = _offsets(enc)
    tags = spans_to_token_tags(offsets, entities)
    assert token_tags_to_spans(tags, offsets) == entities
    first_only = spans_to_token_tags(offsets, entities, label_all_tokens=False)
    assert first_only.count(None) > tags.count(None)  # sub-tokens after the first are ignored


def test_japanese_round_trip_on_real_ner_data(shared_data, tmp_path):
    from bunmyaku.tokenization import train_tokenizer

    records = json.loads((shared_data / "ja-wikipedia-ner" / "ner.json").read_text(encoding="utf-8"))[:200]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(r["text"] for r in records), encoding="utf-8")
    tokenizer = train_tokenizer(
        [corpus], kind="wordpiece", vocab_size=2000, pre_tokenizer="mecab", output_dir=tmp_path / "tok"
    )
    exact = total = 0
    for record in records:
        entities = [{"start": e["span"][0], "end": e["span"][1], "type": e["type"]} for e in record["entities"]]
        enc = tokenizer(record["text"], return_offsets_mapping=True)
        offsets = _offsets(enc)
        back = token_tags_to_spans(spans_to_token_tags(offsets, entities), offsets)
        for span in back:  # every recovered span is real text of the original string
            assert record["text"][span["start"] : span["end"]]
        total += len(entities)
        exact += sum(e in back for e in entities)
    # MeCab word boundaries do not always match entity boundaries; nearly all must survive
    assert exact / total > 0.9, f"only {exact}/{total} entity spans survive tokenization"


def test_tag_schemes_and_entity_f1():
    assert iob1_to_bio(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]) == [
        "B-PER",
        "I-PER",
        "O",
        "B-LOC",
        "B-LOC",
        "B-ORG",
    ]
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    assert entity_f1(gold, gold)["f1"] == 1.0
    assert entity_f1(gold, [["B-PER", "O", "O", "B-LOC"]])["f1"] == pytest.approx(0.5)
