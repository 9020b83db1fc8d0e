"""token-classification against transformers' pipeline: grouped entities with MiniLM's real tokenizer."""

from __future__ import annotations

import unicodedata

import pytest

import bunmyaku
from tests.conftest import require_module
from tests.pipelines.tiny_models import NER_LABELS, bert_head_dir

transformers = require_module("transformers")

TEXTS = [
    "Hugging Face Inc. is a company based in New York City, founded by Clément Delangue.",
    "My name is Wolfgang and I live in Berlin-Kreuzberg; the U.S.A. is far away.",
    "東京都に住む山田太郎さんは、京都大学で働いています。",
]


@pytest.fixture(scope="module")
def ner_dir(minilm_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("ner")
    return bert_head_dir(path, minilm_dir, "BertForTokenClassification", seed=1, id2label=dict(enumerate(NER_LABELS)))


@pytest.fixture(scope="module")
def pipe(ner_dir):
    return bunmyaku.pipeline("token-classification", model=ner_dir, device="cpu")


@pytest.mark.parametrize("aggregation", ["simple", "first", "none"])
def test_entities_match_transformers(pipe, ner_dir, aggregation):
    theirs = transformers.pipeline(
        "token-classification", model=str(ner_dir), device="cpu", aggregation_strategy=aggregation
    )
    got = pipe(TEXTS, aggregation=aggregation)
    for text, entities in zip(TEXTS, got, strict=True):
        expected = theirs(text)
        assert entities, "the random model should tag something"
        key = "entity" if aggregation == "none" else "entity_group"
        assert [(e[key], e["word"], e["start"], e["end"]) for e in entities] == [
            (e[key], e["word"], e["start"], e["end"]) for e in expected
        ]
        for a, b in zip(entities, expected, strict=True):
            assert a["score"] == pytest.approx(float(b["score"]), abs=1e-5)


def _folded(text: str) -> str:
    """What an uncased BERT sees: lower case, accents (and Japanese voicing marks) stripped, no spaces."""
    decomposed = unicodedata.normalize("NFD", text.lower())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch) and not ch.isspace())


def test_offsets_point_into_the_original_text(pipe):
    for text in TEXTS:
        entities = pipe(text, aggregation="first")
        assert entities
        for entity in entities:
            assert _folded(text[entity["start"] : entity["end"]]) == _folded(entity["word"])


def test_long_text_in_windows_keeps_every_token(ner_dir, pipe):
    text = " ".join(TEXTS[:2] * 4)
    windowed = bunmyaku.pipeline("token-classification", model=ner_dir, device="cpu", max_length=24, stride=6)
    tokens = windowed.tokens([text])[0]
    expected = pipe.tokenizer(text, return_offsets_mapping=True, return_tensors="pt")["offset_mapping"][0].tolist()[
        1:-1
    ]
    assert [(t.start, t.end) for t in tokens] == [tuple(o) for o in expected]
    entities = windowed(text, aggregation="none")
    assert entities and all(text[e["start"] : e["end"]] for e in entities)
    with pytest.raises(ValueError, match="aggregation"):
        pipe("x", aggregation="max")
