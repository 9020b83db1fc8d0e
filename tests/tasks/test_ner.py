"""NER spans round-trip characters -> tokens -> characters, in Japanese through MeCab + WordPiece offsets."""

from __future__ import annotations

import json

import pytest

import bunmyaku
from bunmyaku.data.tables import iob1_to_bio
from bunmyaku.tasks.metrics import entity_f1
from bunmyaku.tasks.ner import group_tags, spans_to_token_tags, split_tag, token_tags_to_spans


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
    enc = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
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
        enc = tokenizer(record["text"], return_offsets_mapping=True, return_tensors="pt")
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


def _hf_grouping(labels):
    """The grouping transformers' token-classification pipeline documents (``get_tag`` / ``group_entities``),
    written out here as the oracle: B- opens an entity, I- or a plain label continues one of the same type."""

    def tag(label):
        if label.startswith("B-"):
            return "B", label[2:]
        if label.startswith("I-"):
            return "I", label[2:]
        return "I", label  # not in B- / I- format: a continuation

    groups, current = [], []
    for i, label in enumerate(labels):
        if not current:
            current = [i]
            continue
        bi, kind = tag(label)
        if kind == tag(labels[current[-1]])[1] and bi != "B":
            current.append(i)
        else:
            groups.append((current[0], current[-1] + 1, tag(labels[current[0]])[1]))
            current = [i]
    if current:
        groups.append((current[0], current[-1] + 1, tag(labels[current[0]])[1]))
    return groups


def test_group_tags_matches_the_documented_grouping():
    import random

    rng = random.Random(0)
    vocabulary = ["O", "B-PER", "I-PER", "PER", "B-LOC", "I-LOC", "LOC", "MISC"]
    for _ in range(300):
        labels = [rng.choice(vocabulary) for _ in range(rng.randint(1, 12))]
        assert group_tags(labels) == _hf_grouping(labels), labels


def test_plain_labels_group_into_spans():
    offsets = [None, (0, 4), (5, 10), (11, 13), (14, 19), (19, 22), None]
    tags = [None, "PER", "PER", "O", "LOC", "LOC", None]  # a scheme without B- / I- (crashed before)
    assert token_tags_to_spans(tags, offsets) == [
        {"start": 0, "end": 10, "type": "PER"},
        {"start": 14, "end": 22, "type": "LOC"},
    ]
    mixed = [None, "B-PER", "B-PER", "O", "I-LOC", "LOC", None]  # B- splits; I- after O opens an entity
    assert token_tags_to_spans(mixed, offsets) == [
        {"start": 0, "end": 4, "type": "PER"},
        {"start": 5, "end": 10, "type": "PER"},
        {"start": 14, "end": 22, "type": "LOC"},
    ]
    assert split_tag("B-PER") == ("B", "PER") and split_tag("PER") == ("I", "PER") and split_tag("O") == ("I", "O")


def test_sub_tokens_continue_a_plain_label(tiny_ner_task):
    """Predictions of a word's later sub-tokens continue its first sub-token's label, plain labels included."""
    task = tiny_ner_task(["O", "PER", "LOC"])
    feature = {"_first": [False, True, False, True, False], "_words": [None, 0, 0, 1, None]}
    tags = task._tags(feature, [0, 1, 0, 2, 0])
    assert tags == [None, "PER", "I-PER", "LOC", None]
    assert token_tags_to_spans(tags, [None, (0, 2), (2, 4), (5, 8), None]) == [
        {"start": 0, "end": 4, "type": "PER"},
        {"start": 5, "end": 8, "type": "LOC"},
    ]


@pytest.fixture
def tiny_ner_task():
    from bunmyaku.tasks.finetune import FinetuneArgs, build_task

    def make(labels):
        task = build_task(FinetuneArgs(task="token-classification", format="spans"))
        task.labels = labels
        return task

    return make
