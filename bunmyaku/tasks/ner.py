"""Token classification / NER: character spans <-> token tags, tag schemes, entity-level F1.

Entities are character spans ``{"start", "end", "type"}`` into the original text (the layout of
ja-wikipedia-ner). Training tags come from the tokenizer's offsets: a token inside an entity gets
``B-type`` when it starts the entity and ``I-type`` after; tokens outside get ``O``. Predicted tags turn
back into character spans through the same offsets, so spans survive the round trip exactly when
entity boundaries fall on token boundaries.
"""

from __future__ import annotations

from typing import Any

from bunmyaku.data.tables import iob1_to_bio

__all__ = ["entity_f1", "iob1_to_bio", "spans_to_token_tags", "token_tags_to_spans"]


def spans_to_token_tags(
    offsets: list[tuple[int, int] | None], entities: list[dict[str, Any]], label_all_tokens: bool = True
) -> list[str | None]:
    """BIO tags for the tokens of one sequence.

    Args:
        offsets: per token, its [start, end) characters, or None for special / padding tokens.
        entities: ``{"start", "end", "type"}`` character spans.
        label_all_tokens: tag every sub-token; when False only the first token of each word is tagged
            (the others get None, i.e. ignored by the loss). Word starts are tokens whose start is not
            the previous token's end.

    Returns:
        One tag per token, None where the loss ignores the token.
    """
    tags: list[str | None] = []
    prev_end = None
    for offset in offsets:
        if offset is None or offset[0] == offset[1]:
            tags.append(None)
            prev_end = None
            continue
        start, end = offset
        continues_word = prev_end is not None and start == prev_end
        prev_end = end
        entity = next((e for e in entities if e["start"] <= start and end <= e["end"]), None)
        if entity is None:
            tag = "O"
        else:
            tag = ("B-" if start == entity["start"] else "I-") + entity["type"]
        tags.append(None if continues_word and not label_all_tokens else tag)
    return tags


def token_tags_to_spans(tags: list[str | None], offsets: list[tuple[int, int] | None]) -> list[dict[str, Any]]:
    """Group BIO token tags into character spans ``{"start", "end", "type"}`` (I- after O opens an entity)."""
    spans: list[dict[str, Any]] = []
    current = None
    for tag, offset in zip(tags, offsets, strict=True):
        if offset is None or offset[0] == offset[1] or tag is None:
            continue
        if tag == "O":
            current = None
            continue
        prefix, kind = tag.split("-", 1)
        if prefix == "B" or current is None or current["type"] != kind:
            current = {"start": offset[0], "end": offset[1], "type": kind}
            spans.append(current)
        else:
            current["end"] = offset[1]
    return spans


def entity_f1(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Entity-level precision / recall / F1 over BIO tag sequences, with ``seqeval`` (strict entity match)."""
    try:
        from seqeval.metrics import f1_score, precision_score, recall_score
    except ImportError as e:  # pragma: no cover - seqeval is in the train and dev extras
        raise ImportError("entity F1 needs seqeval: pip install 'bunmyaku[train]'") from e
    return {
        "precision": precision_score(gold, predicted),
        "recall": recall_score(gold, predicted),
        "f1": f1_score(gold, predicted),
    }
