"""Token classification (NER, tagging): entities as character spans of the original text, with scores.

Each token gets the label the model scores highest; ``aggregation`` then decides what comes back:

- ``"none"``: one entry per token (``entity`` is its label, ``index`` its position in the window);
- ``"simple"``: neighbouring tokens with the same entity type are grouped (a ``B-`` tag starts a new
  group; :func:`bunmyaku.tasks.ner.group_tags`), the group's score is the mean of its tokens' scores;
- ``"first"``: each word takes the label of its first token before grouping, so an entity never splits a
  word (words as the tokenizer's pre-tokenizer sees them: MeCab words for Japanese, for instance).

Texts longer than the model's window are cut into windows sharing ``stride`` tokens (``long_strategy``
``windows``, the default; ``truncate`` keeps the first window only); a token seen in two windows keeps the
scores of the window where it has the most context on both sides (:func:`bunmyaku.tasks.windows.best_windows`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from bunmyaku.pipelines.base import Pipeline, check_at_least
from bunmyaku.pipelines.batching import label_names, length_sorted_batches, max_input_length, model_inputs
from bunmyaku.tasks import windows as long
from bunmyaku.tasks.base import collate_features, pad_id
from bunmyaku.tasks.ner import group_tags

Aggregation = Literal["none", "simple", "first"]


@dataclass
class _Token:
    """One scored token of a text: its piece, character span, word index, label scores and place in its window."""

    piece: str  # the vocabulary entry; for the unknown token, the text it stands for
    start: int
    end: int
    word: int | None
    scores: torch.Tensor  # (L,)
    index: int


class TokenClassificationPipeline(Pipeline):
    """Named entities (or any token tags) with character offsets into the input text.

    Args:
        model: a folder (or hub id) with a token-classification checkpoint and its tokenizer.
        device: where to run; default CUDA when available.
        aggregation: "simple" (default), "first" or "none" (see the module docstring).
        aggregation_strategy: transformers' name for ``aggregation`` (give one of the two); note that
            transformers defaults to "none".
        ignore_labels: labels left out of the results.
        batch_size: windows per forward pass (sorted by length first).
        max_length: tokens per window; default the model's limit.
        stride: tokens shared by neighbouring windows of a long text.
        long_strategy: ``windows`` (default) or ``truncate`` for texts longer than ``max_length``.
    """

    head = "token-classification"

    def __init__(
        self,
        model: str | os.PathLike,
        device: str | None = None,
        aggregation: Aggregation | None = None,
        ignore_labels: tuple[str, ...] = ("O",),
        batch_size: int = 16,
        max_length: int | None = None,
        stride: int = 32,
        aggregation_strategy: Aggregation | None = None,
        long_strategy: Literal["truncate", "windows"] = "windows",
    ):
        if long_strategy not in ("truncate", "windows"):
            raise ValueError(f"long_strategy for token classification is windows or truncate, not {long_strategy!r}")
        self.long_strategy = long_strategy
        aggregation = _one_aggregation(aggregation, aggregation_strategy, "simple")
        check_at_least("batch_size", batch_size)
        check_at_least("max_length", max_length)
        super().__init__(model, device)
        self.labels = label_names(self.model.config)
        self.aggregation = _check_aggregation(aggregation)
        self.ignore_labels = set(ignore_labels)
        self.batch_size = batch_size
        self.max_length = max_input_length(self.tokenizer, self.model.config, max_length)
        if not 0 <= stride < self.max_length - self.tokenizer.num_special_tokens_to_add():
            raise ValueError(f"stride {stride} must be smaller than the window ({self.max_length} tokens)")
        self.stride = stride

    @torch.inference_mode()
    def tokens(self, texts: list[str]) -> list[list[_Token]]:
        """The scored tokens of each text, special tokens left out, in text order."""
        windows = long.cut(
            self.tokenizer, texts, max_length=self.max_length, strategy=self.long_strategy, stride=self.stride
        )
        probs: list[torch.Tensor] = [torch.empty(0)] * len(windows)
        pad = pad_id(self.tokenizer)
        for rows in length_sorted_batches([len(w["input_ids"]) for w in windows], self.batch_size):
            rows_in = [{"index": 0, **{k: windows[i][k] for k in long.INPUT_KEYS if k in windows[i]}} for i in rows]
            logits = self.model(**model_inputs(collate_features(rows_in, pad), self.device)).logits
            for row, p in zip(rows, logits.float().softmax(-1).cpu(), strict=True):
                probs[row] = p
        by_text: list[list[int]] = [[] for _ in texts]
        for w, window in enumerate(windows):
            by_text[window["example"]].append(w)
        unk = self.tokenizer.unk_token_id
        found = []
        for owner, rows in enumerate(by_text):
            chosen = long.best_windows([windows[w] for w in rows])
            tokens = []
            for w, j in chosen.values():  # in document order
                window = windows[rows[w]]
                start, end = window["_offsets"][j]
                token_id = window["input_ids"][j]
                piece = texts[owner][start:end] if token_id == unk else self.tokenizer.convert_ids_to_tokens(token_id)
                tokens.append(_Token(piece, start, end, window["_words"][j], probs[rows[w]][j], j))
            found.append(tokens)
        return found

    def __call__(
        self,
        inputs: str | list[str],
        aggregation: Aggregation | None = None,
        aggregation_strategy: Aggregation | None = None,
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Entities in a text (or each of a list).

        Args:
            inputs: a text or a list of texts.
            aggregation: override the pipeline's aggregation for this call.
            aggregation_strategy: transformers' name for ``aggregation``.

        Returns:
            Per text, a list of ``{"entity_group", "score", "word", "start", "end"}`` in text order
            (``{"entity", "score", "index", "word", "start", "end"}`` per token with ``"none"``); ``start`` /
            ``end`` are character offsets into the text, so ``text[start:end]`` is the entity as written.
        """
        aggregation = _check_aggregation(_one_aggregation(aggregation, aggregation_strategy, self.aggregation))
        single = isinstance(inputs, str)
        texts = [inputs] if single else list(inputs)
        if not texts:
            return []
        results = []
        for tokens in self.tokens(texts):
            if aggregation == "none":
                entities = [self._token_entity(t) for t in tokens]
                results.append([e for e in entities if e["entity"] not in self.ignore_labels])
                continue
            tagged = self._word_tags(tokens) if aggregation == "first" else self._token_tags(tokens)
            runs = group_tags([label for label, _, _ in tagged])
            groups = [self._group_entity(tagged[first:last], kind) for first, last, kind in runs]
            results.append([g for g in groups if g["entity_group"] not in self.ignore_labels])
        return results[0] if single else results

    def _token_entity(self, token: _Token) -> dict[str, Any]:
        score, label = token.scores.max(-1)
        return {
            "entity": self.labels[int(label)],
            "score": float(score),
            "index": token.index,
            "word": token.piece,
            "start": token.start,
            "end": token.end,
        }

    def _token_tags(self, tokens: list[_Token]) -> list[tuple[str, float, list[_Token]]]:
        """(label, score, [token]) for each token: its best label."""
        tagged = []
        for token in tokens:
            score, label = token.scores.max(-1)
            tagged.append((self.labels[int(label)], float(score), [token]))
        return tagged

    def _word_tags(self, tokens: list[_Token]) -> list[tuple[str, float, list[_Token]]]:
        """(label, score, tokens) for each word: the best label of the word's first token."""
        words: list[list[_Token]] = []
        for token in tokens:
            if words and token.word is not None and token.word == words[-1][-1].word:
                words[-1].append(token)
            else:
                words.append([token])
        tagged = []
        for word in words:
            score, label = word[0].scores.max(-1)
            tagged.append((self.labels[int(label)], float(score), word))
        return tagged

    def _group_entity(self, group: list[tuple[str, float, list[_Token]]], kind: str) -> dict[str, Any]:
        tokens = [t for _, _, word in group for t in word]
        return {
            "entity_group": kind,
            "score": sum(score for _, score, _ in group) / len(group),
            "word": self._join([t.piece for t in tokens]),
            "start": tokens[0].start,
            "end": tokens[-1].end,
        }

    def _join(self, pieces: list[str]) -> str:
        """Pieces as text, the way the tokenizer's decoder joins them (``##`` continuations glued on)."""
        decoder = self.tokenizer.backend.decoder
        return decoder.decode(pieces) if decoder is not None else "".join(pieces)


def _one_aggregation(aggregation: str | None, aggregation_strategy: str | None, default: str) -> str:
    """``aggregation`` or transformers' ``aggregation_strategy``, whichever is given; refused if they differ."""
    if aggregation is not None and aggregation_strategy is not None and aggregation != aggregation_strategy:
        raise ValueError(
            f"aggregation={aggregation!r} and aggregation_strategy={aggregation_strategy!r} disagree; give one"
        )
    return aggregation or aggregation_strategy or default


def _check_aggregation(aggregation: str) -> Aggregation:
    if aggregation not in ("none", "simple", "first"):
        raise ValueError(f"unknown aggregation {aggregation!r}; use 'none', 'simple' or 'first'")
    return aggregation  # type: ignore[return-value]
