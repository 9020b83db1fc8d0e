"""Token classification / NER: character spans <-> token tags, grouping tags into entities, the task.

Entities are character spans ``{"start", "end", "type"}`` into the original text (the layout of
ja-wikipedia-ner). Training tags come from the tokenizer's offsets: a token inside an entity gets
``B-type`` when it starts the entity and ``I-type`` after; tokens outside get ``O``. Predicted tags turn
back into character spans through the same offsets, so spans survive the round trip exactly when
entity boundaries fall on token boundaries.

With ``long_strategy`` windows a long text is cut into overlapping windows (:mod:`bunmyaku.tasks.windows`), each a
training row with its own aligned tags; metrics and predictions are per text, each token taken from the window
where it has the most context on both sides.

:func:`group_tags` is the one BIO grouping, shared with the token-classification pipeline; labels without a
``B-`` / ``I-`` prefix (``PER``, or schemes with no ``O``) group as continuations of their type.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bunmyaku.data.tables import DataError, read_conll, read_table, where
from bunmyaku.tasks import windows as long
from bunmyaku.tasks.base import IGNORE_INDEX, Feature, Task, model_inputs
from bunmyaku.tasks.metrics import accuracy, entity_f1

__all__ = ["TokenClassification", "group_tags", "spans_to_token_tags", "split_tag", "token_tags_to_spans"]

OUTSIDE = "O"


def split_tag(label: str) -> tuple[str, str]:
    """``"B-PER"`` -> ("B", "PER"); a label without a ``B-`` / ``I-`` prefix continues its type: ("I", label)."""
    if label[:2] in ("B-", "I-") and len(label) > 2:
        return label[0], label[2:]
    return "I", label


def continuation(label: str) -> str:
    """The tag of a later piece of the same word or entity: ``B-PER`` -> ``I-PER``; ``O`` stays ``O``."""
    kind = split_tag(label)[1]
    return OUTSIDE if kind == OUTSIDE else f"I-{kind}"


def group_tags(labels: Sequence[str]) -> list[tuple[int, int, str]]:
    """Runs of neighbouring labels of one type, as ``(first, last + 1, type)`` index ranges in order.

    A ``B-`` label always opens a new run; ``I-`` (or a plain label) continues the previous run when its type is
    the same and opens one otherwise (an ``I-`` after ``O`` starts an entity). ``O`` labels form runs of type
    ``O`` like any other, for the caller to drop.
    """
    runs: list[tuple[int, int, str]] = []
    for i, label in enumerate(labels):
        prefix, kind = split_tag(label)
        if runs and prefix != "B" and runs[-1][2] == kind:
            runs[-1] = (runs[-1][0], i + 1, kind)
        else:
            runs.append((i, i + 1, kind))
    return runs


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
    """Group token tags into character spans ``{"start", "end", "type"}`` with :func:`group_tags`; tokens with
    no tag or no characters (special tokens) are skipped without ending an entity."""
    kept = [(tag, o) for tag, o in zip(tags, offsets, strict=True) if tag is not None and o is not None and o[0] < o[1]]
    return [
        {"start": kept[first][1][0], "end": kept[last - 1][1][1], "type": kind}
        for first, last, kind in group_tags([tag for tag, _ in kept])
        if kind != OUTSIDE
    ]


# ------------------------------------------------------------------------------------------------
# The fine-tuning task


def _read_spans(path: str | os.PathLike, text_key: str, entity_key: str) -> list[dict[str, Any]]:
    """Texts with character-span entities: a JSON list or JSONL of ``{text, entities: [{span | start, end, type}]}``."""
    path = Path(path)
    fmt = "jsonl" if path.suffix.lower() == ".jsonl" else "json"
    records = read_table(path, format=fmt, columns=[text_key], texts=[text_key])
    return _parse_spans(records, text_key, entity_key, str(path))


def _parse_spans(records: list[dict[str, Any]], text_key: str, entity_key: str, source: str) -> list[dict[str, Any]]:
    """Check each record's entities and store them as ``_entities`` ``[{start, end, type}]``."""
    for r in records:
        at = where(r, source)
        entities = r.get(entity_key) if entity_key in r else r.get("entities", [])
        if not isinstance(entities, list | type(None)):
            raise DataError(f"{at}: {entity_key!r} must be a list of entities, got {type(entities).__name__}")
        spans = []
        for e in entities or []:
            if isinstance(e, dict) and "span" in e and isinstance(e["span"], list) and len(e["span"]) == 2:
                start, end = e["span"]
            elif isinstance(e, dict) and "start" in e and "end" in e:
                start, end = e["start"], e["end"]
            else:
                raise DataError(f"{at}: an entity needs 'span' [start, end) or 'start' and 'end': {e}")
            offsets_ok = all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end))
            if not offsets_ok or not 0 <= start < end <= len(r[text_key]) or "type" not in e:
                raise DataError(f"{at}: entity {e} is outside the text or has no 'type'")
            spans.append({"start": start, "end": end, "type": str(e["type"])})
        r["_entities"] = spans
    return records


class TokenClassification(Task):
    """NER / tagging from CoNLL files (``format: conll``, BIO or IOB1) or texts with character spans (``spans``).

    Training labels go on the first sub-token of each word (``label_all_tokens`` tags the others too);
    predictions come back as character spans (spans format) or one tag per word (CoNLL). ``f1`` is seqeval's
    strict entity F1 on the scored tokens; ``accuracy`` is tag accuracy on them.
    """

    name = "token-classification"
    head = "token-classification"
    metric = "f1"

    @property
    def conll(self) -> bool:
        return self.settings.format == "conll"

    def columns(self, labelled: bool) -> list[str]:
        return [self.settings.text_column]

    def read(self, path, labelled: bool = True) -> list[dict[str, Any]]:
        s = self.settings
        if self.conll:
            return read_conll(path, scheme=s.tag_scheme)
        return _read_spans(path, s.text_column, s.label_column)

    def read_records(self, records, labelled: bool = True) -> list[dict[str, Any]]:
        s = self.settings
        if self.conll:
            for r in records:
                tokens, tags = r.get("tokens"), r.get("tags")
                if not isinstance(tokens, list) or (labelled and not isinstance(tags, list)):
                    raise DataError(f"{where(r)}: a CoNLL-style record needs 'tokens' and 'tags' lists")
                if labelled and len(tokens) != len(tags):
                    raise DataError(f"{where(r)}: {len(tokens)} tokens but {len(tags)} tags")
            return records
        records = super().read_records(records, labelled=False)
        return _parse_spans(records, s.text_column, s.label_column, "")

    def gold(self, example):
        return example["tags"] if self.conll else example.get("_entities")

    def fit_labels(self, examples: list[dict[str, Any]]) -> None:
        if self.conll:
            types = {t[2:] for e in examples for t in e["tags"] if t != "O"}
        else:
            types = {span["type"] for e in examples for span in e["_entities"]}
        self.labels = ["O"] + [f"{p}-{t}" for t in sorted(types) for p in ("B", "I")]

    def encode(self, tokenizer, examples, labelled=True, source=""):
        s = self.settings
        texts = [e["tokens"] for e in examples] if self.conll else [str(e[s.text_column]) for e in examples]
        if getattr(s, "long_strategy", "truncate") == "windows":
            return self._encode_windows(tokenizer, examples, texts, labelled, source)
        enc = tokenizer(
            texts,
            truncation=True,
            max_length=s.max_length,
            is_split_into_words=self.conll,
            return_offsets_mapping=True,  # also makes the tokenizer keep word ids (its fast path drops them)
            return_tensors=None,
        )
        ids = {name: i for i, name in enumerate(self.labels or [])}
        features = []
        for i, example in enumerate(examples):
            word_ids = enc.word_ids(i)
            first = [w is not None and (t == 0 or word_ids[t - 1] != w) for t, w in enumerate(word_ids)]
            feature = {k: enc[k][i] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            feature.update(example=i, _first=first, _words=word_ids)
            if not self.conll:
                pairs = zip(enc["offset_mapping"][i], enc.sequence_ids(i), strict=True)
                feature["_offsets"] = [tuple(o) if q is not None else None for o, q in pairs]
            if labelled:
                tags = self._token_tags(example, feature)
                for tag in tags:
                    if tag is not None and tag not in ids:
                        raise DataError(f"{where(example, source)}: tag {tag!r} was not seen in the training data")
                feature["labels"] = [ids[t] if t is not None else IGNORE_INDEX for t in tags]
            features.append(feature)
        return features

    def _encode_windows(self, tokenizer, examples, texts, labelled: bool, source: str) -> list[Feature]:
        """Every window of every text (``long_strategy`` windows), each a training row of its own; a word's first
        token is found on the whole text, so a window that starts inside a word does not restart it."""
        s = self.settings
        split = self.conll
        windows = long.cut(
            tokenizer, texts, max_length=s.max_length, strategy="windows", stride=s.stride, is_split_into_words=split
        )
        words: dict[tuple[int, int], int] = {}  # (text, position) -> word
        for window in windows:
            for p, w in zip(window["_positions"], window["_words"], strict=True):
                if p is not None:
                    words[window["example"], p] = w
        ids = {name: i for i, name in enumerate(self.labels or [])}
        features = []
        for window in windows:
            i = window["example"]
            first = [
                p is not None and w is not None and (p == 0 or words.get((i, p - 1)) != w)
                for p, w in zip(window["_positions"], window["_words"], strict=True)
            ]
            feature = {k: window[k] for k in long.INPUT_KEYS if k in window}
            feature.update(example=i, _first=first, _words=window["_words"], _positions=window["_positions"])
            if not self.conll:
                feature["_offsets"] = window["_offsets"]
            if labelled:
                tags = self._token_tags(examples[i], feature)
                for tag in tags:
                    if tag is not None and tag not in ids:
                        raise DataError(f"{where(examples[i], source)}: tag {tag!r} was not seen in the training data")
                feature["labels"] = [ids[t] if t is not None else IGNORE_INDEX for t in tags]
            features.append(feature)
        return features

    def documents(self, examples, features, outputs) -> tuple[list[Feature], list[Any]]:
        """One feature and one output per example: with windows, each token of a text taken from the window where
        it has the most context (:func:`bunmyaku.tasks.windows.best_windows`); special tokens dropped. Outputs are
        anything indexed by token first (tag ids (T,), probabilities (T, L))."""
        if not features or "_positions" not in features[0]:
            return features, outputs
        by_example: dict[int, list[int]] = {}
        for f, feature in enumerate(features):
            by_example.setdefault(feature["example"], []).append(f)
        doc_features, doc_outputs = [], []
        for i in range(len(examples)):
            rows = by_example.get(i, [])
            windows = [features[f] for f in rows]
            chosen = list(long.best_windows(windows).values())
            keys = [k for k in ("_first", "_words", "_offsets", "labels") if k in windows[0]] if windows else []
            doc = {k: [windows[w][k][j] for w, j in chosen] for k in keys}
            doc["example"] = i
            doc_features.append(doc)
            picked = [outputs[rows[w]][j] for w, j in chosen]
            doc_outputs.append(torch.stack(picked) if picked else torch.zeros(0, dtype=torch.long))
        return doc_features, doc_outputs

    def _token_tags(self, example: dict[str, Any], feature: Feature) -> list[str | None]:
        first, words = feature["_first"], feature["_words"]
        label_all = self.settings.label_all_tokens
        if self.conll:
            tags = []
            for is_first, w in zip(first, words, strict=True):
                word_tag = example["tags"][w] if w is not None else None
                if word_tag is not None and not is_first:
                    word_tag = continuation(word_tag) if label_all else None
                tags.append(word_tag)
            return tags
        tags = spans_to_token_tags(feature["_offsets"], example["_entities"], label_all_tokens=True)
        return [t if label_all or is_first else None for t, is_first in zip(tags, first, strict=True)]

    def count(self, batch):
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def forward(self, model, batch):
        out = model(**model_inputs(batch))
        return out.loss, out.logits.detach().argmax(-1)  # (B, T) tag ids

    def _tags(self, feature: Feature, predicted: torch.Tensor) -> list[str | None]:
        """Predicted tag per token; a word's later sub-tokens continue its first sub-token's entity."""
        names = self.labels or []
        tags: list[str | None] = []
        word_tag = None
        for t, (is_first, w) in enumerate(zip(feature["_first"], feature["_words"], strict=True)):
            if w is None:
                tags.append(None)
                continue
            tag = names[int(predicted[t])]
            if is_first:
                word_tag = tag
            elif not self.settings.label_all_tokens:
                tag = continuation(word_tag) if word_tag else OUTSIDE
            tags.append(tag)
        return tags

    def metrics(self, examples, features, outputs):
        features, outputs = self.documents(examples, features, outputs)
        names = self.labels or []
        gold, pred = [], []
        for feature, predicted in zip(features, outputs, strict=True):
            scored = [t for t, label in enumerate(feature["labels"]) if label != IGNORE_INDEX]
            gold.append([names[feature["labels"][t]] for t in scored])
            pred.append([names[int(predicted[t])] for t in scored])
        flat_gold, flat_pred = [t for tags in gold for t in tags], [t for tags in pred for t in tags]
        return {**entity_f1(gold, pred), "accuracy": accuracy(flat_gold, flat_pred)}

    def predictions(self, examples, features, outputs):
        features, outputs = self.documents(examples, features, outputs)
        records = []
        for example, feature, predicted in zip(examples, features, outputs, strict=True):
            tags = self._tags(feature, predicted)
            if self.conll:
                words = [None] * len(example["tokens"])
                for tag, is_first, w in zip(tags, feature["_first"], feature["_words"], strict=True):
                    if w is not None and is_first:
                        words[w] = tag
                records.append({"tokens": example["tokens"], "tags": [t or "O" for t in words]})
                continue
            text = example[self.settings.text_column]
            spans = token_tags_to_spans(tags, feature["_offsets"])
            records.append({"text": text, "entities": [{**sp, "text": text[sp["start"] : sp["end"]]} for sp in spans]})
        return records
