"""Long documents: one way to cut a tokenized document into model-sized pieces, shared by every task family.

A model takes ``max_length`` tokens; a longer document is handled by one of three strategies
(``long_strategy``):

- ``truncate``: keep the first ``max_length`` tokens (special tokens included), drop the rest;
- ``head-tail``: keep the first ``head_tokens`` tokens of the document and its last
  ``max_length - head_tokens - specials`` tokens (Sun et al. 2019, "How to fine-tune BERT for text
  classification?": the head and the tail carry most of a review's label);
- ``windows``: cut the whole document into windows of ``max_length`` tokens, consecutive windows sharing
  ``stride`` tokens, so that every token is in at least one window and sees ``stride / 2`` tokens of context
  on each side of a cut.

For a pair (a question and its context, a premise and a long hypothesis) the *second* text is cut and the
first is kept whole in every window, as extractive QA keeps the question. :func:`cut` does all three on top of
the tokenizer's own overflowing windows, so the windows are exactly those ``transformers`` QA examples build.
Every window records, per token, its characters in the windowed text (``_offsets``), its index among the
document's tokens (``_positions``: the same token in two windows has the same position) and its word
(``_words``); specials and the kept first text get None.

How the windows' outputs become one result per document depends on the task:

- sequence classification pools the windows' logits per document (:func:`pool`): ``mean``, ``max``, or
  ``attention`` (:class:`WindowAttention`: a learned score of each window's first-token vector, softmaxed over
  the document's windows, weights its logits), and trains on whole documents (:func:`collate_windows` keeps a
  document's windows in one batch, the loss is per document);
- token classification takes each token's output from the window where it has the most context on both sides
  (:func:`best_windows`: the largest ``min(left, right)``, the earlier window on a tie);
- extractive QA searches answer spans in every window of a question (:mod:`bunmyaku.tasks.qa`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from bunmyaku.training.args import check_int

logger = logging.getLogger(__name__)

Strategy = Literal["truncate", "head-tail", "windows"]
Pooling = Literal["mean", "max", "attention"]
STRATEGIES: tuple[str, ...] = ("truncate", "head-tail", "windows")
POOLINGS: tuple[str, ...] = ("mean", "max", "attention")
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
POOLER_FILE = "window_pooling.safetensors"  # the attention pooler, beside the HF weights of a fine-tuned model


def check_options(strategy: str, stride: int, head_tokens: int, pooling: str, max_length: int | None = None) -> None:
    """Refuse unknown strategies / poolings and window sizes that cannot work, naming the option."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown long_strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown window_pooling {pooling!r}; expected one of {list(POOLINGS)}")
    check_int("stride", stride, low=0)
    check_int("head_tokens", head_tokens, low=0)
    if max_length is not None and strategy == "head-tail" and head_tokens >= max_length - 2:
        raise ValueError(
            f"head_tokens {head_tokens} leaves no room for the tail in max_length {max_length} (with [CLS] and "
            "[SEP]): give head_tokens below max_length - 2, e.g. 128 for 512"
        )


def fit_stride(tokenizer: Any, firsts: Sequence[str] | None, max_length: int, stride: int) -> int:
    """``stride``, lowered (with a warning) when the windowed text has fewer tokens per window than that: the
    tokenizers library needs the overlap to be smaller than the room. The room is ``max_length`` less the special
    tokens and, for pairs, the longest first text.

    Raises:
        ValueError: the first text leaves fewer than two tokens for the windowed one.
    """
    if firsts is None:
        room = max_length - tokenizer.num_special_tokens_to_add(False)
        what = "the special tokens"
    else:
        longest = max((len(ids) for ids in tokenizer(list(firsts), return_tensors=None)["input_ids"]), default=0)
        room = max_length - longest - 1  # the first text's own special tokens are counted; one more [SEP]
        what = f"a {longest}-token first text (question)"
    if room < 2:
        raise ValueError(f"max_length {max_length} leaves no room for the windowed text after {what}")
    if stride >= room:
        logger.warning("stride %d lowered to %d: %s leaves %d tokens per window", stride, room // 2, what, room)
        return room // 2
    return stride


def cut(
    tokenizer: Any,
    texts: Sequence[Any],
    pairs: Sequence[str] | None = None,
    *,
    max_length: int,
    strategy: str = "windows",
    stride: int = 0,
    head_tokens: int = 128,
    is_split_into_words: bool = False,
) -> list[dict[str, Any]]:
    """Tokenize documents (or pairs) and cut each into model inputs by ``strategy``.

    Args:
        tokenizer: a ``bunmyaku.Tokenizer``.
        texts: the documents; with ``pairs``, the first texts (kept whole).
        pairs: the second texts, which are windowed (None: single texts).
        max_length: tokens per window, special tokens (and the kept first text) included.
        strategy: ``truncate``, ``head-tail`` or ``windows`` (module docstring).
        stride: ``windows``: tokens shared by consecutive windows (lowered by :func:`fit_stride` when too large).
        head_tokens: ``head-tail``: tokens kept from the start of the windowed text.
        is_split_into_words: texts are lists of words (CoNLL).

    Returns:
        The windows in document order, each a dict of lists: ``input_ids``, ``attention_mask`` (and
        ``token_type_ids`` when the model takes them), ``example`` (its document's index), ``_offsets`` (per token
        its (start, end) characters in the windowed text, None for the others), ``_positions`` (its index among
        the document's windowed-text tokens, None for the others) and ``_words`` (its word, None for specials).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown long_strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    texts = list(texts)
    if not texts:
        return []
    windowed = 0 if pairs is None else 1  # the sequence id of the text that is cut
    common = {"return_offsets_mapping": True, "is_split_into_words": is_split_into_words, "return_tensors": None}
    if strategy == "windows":
        stride = fit_stride(tokenizer, None if pairs is None else texts, max_length, stride)
        enc = tokenizer(
            texts,
            pairs,
            truncation="only_second" if pairs is not None else True,
            max_length=max_length,
            stride=stride,
            return_overflowing_tokens=True,
            **common,
        )
        owners = enc["overflow_to_sample_mapping"]
    elif strategy == "truncate":
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, **common)
        owners = list(range(len(texts)))
    else:
        enc = tokenizer(texts, pairs, truncation=False, **common)
        owners = list(range(len(texts)))
    windows: list[dict[str, Any]] = []
    next_start: dict[int, int] = {}  # per document, the position of the next window's first token
    for w, owner in enumerate(owners):
        seq = enc.sequence_ids(w)
        inside = [j for j, s in enumerate(seq) if s == windowed]
        start = next_start.get(owner, 0)
        next_start[owner] = start + len(inside) - stride  # the next window repeats the last ``stride`` tokens
        rank = {j: start + k for k, j in enumerate(inside)}
        window = {k: list(enc[k][w]) for k in INPUT_KEYS if k in enc}
        window["example"] = owner
        spans = enc["offset_mapping"][w]
        window["_offsets"] = [tuple(o) if s == windowed else None for o, s in zip(spans, seq, strict=True)]
        window["_positions"] = [rank.get(j) for j in range(len(seq))]
        window["_words"] = [wid if s == windowed else None for wid, s in zip(enc.word_ids(w), seq, strict=True)]
        if strategy == "head-tail":
            window = _head_tail(window, inside, max_length, head_tokens)
        windows.append(window)
    return windows


def _head_tail(window: dict[str, Any], inside: list[int], max_length: int, head: int) -> dict[str, Any]:
    """Keep every token outside the windowed text, its first ``head`` tokens and as many of its last ones as fit."""
    room = max_length - (len(window["input_ids"]) - len(inside))  # tokens the windowed text may keep
    if head >= room:
        raise ValueError(
            f"head_tokens {head} leaves no room for the tail: max_length {max_length} keeps {room} tokens of the "
            "text after the special tokens (and the first text of a pair); lower head_tokens"
        )
    if len(inside) <= room:
        return window
    dropped = set(inside[head : len(inside) - (room - head)])
    keep = [j for j in range(len(window["input_ids"])) if j not in dropped]
    return {k: [v[j] for j in keep] if isinstance(v, list) else v for k, v in window.items()}


# ------------------------------------------------------------------------------------------------
# Token tasks: the window with the most context


def best_windows(windows: Sequence[dict[str, Any]]) -> dict[int, tuple[int, int]]:
    """For every document position, ``(window, token)``: the window (index into ``windows``, all of one document)
    and the token in it where the position has the most context, ``min(tokens before, tokens after)`` inside the
    window's windowed text; the earlier window wins a tie."""
    best: dict[int, tuple[int, int, int]] = {}
    for w, window in enumerate(windows):
        inside = [j for j, p in enumerate(window["_positions"]) if p is not None]
        for k, j in enumerate(inside):
            context = min(k, len(inside) - 1 - k)
            position = window["_positions"][j]
            if position not in best or context > best[position][2]:
                best[position] = (w, j, context)
    return {p: (w, j) for p, (w, j, _) in sorted(best.items())}


# ------------------------------------------------------------------------------------------------
# Sequence tasks: whole documents in a batch, pooled logits


def collate_windows(features: list[dict[str, Any]], pad: int) -> dict[str, torch.Tensor]:
    """A batch of documents whose ``input_ids`` (and masks) are lists of windows: the windows flattened to (W, T),
    ``window_doc`` (W,) the batch row of each window's document, ``index`` (B,) and ``labels`` (B, ...) per
    document."""
    from bunmyaku.tasks.base import collate_features

    rows, owner = [], []
    for b, feature in enumerate(features):
        for w in range(len(feature["input_ids"])):
            rows.append({"index": 0, **{k: feature[k][w] for k in INPUT_KEYS if k in feature}})
            owner.append(b)
    batch = collate_features(rows, pad)
    batch["index"] = torch.tensor([f["index"] for f in features])
    batch["window_doc"] = torch.tensor(owner)
    if "labels" in features[0]:
        batch["labels"] = torch.tensor([f["labels"] for f in features])
    return batch


def pool(logits: torch.Tensor, owner: torch.Tensor, documents: int, mode: str, weights: torch.Tensor | None = None):
    """(W, C) window logits -> (D, C) document logits: the mean or max over each document's windows, or with
    ``weights`` (W,) (attention scores), their softmax over each document's windows weighting the logits."""
    C = logits.shape[-1]
    index = owner.unsqueeze(-1).expand(-1, C)
    if mode == "max":
        out = logits.new_full((documents, C), float("-inf"))
        return out.scatter_reduce(0, index, logits, reduce="amax", include_self=True)
    if mode == "mean":
        total = logits.new_zeros((documents, C)).index_add(0, owner, logits)
        return total / torch.bincount(owner, minlength=documents).clamp_min(1).unsqueeze(-1).to(logits.dtype)
    if weights is None:
        raise ValueError("attention pooling needs window scores")
    weights = weights.float()
    top = weights.new_full((documents,), float("-inf")).scatter_reduce(0, owner, weights, "amax")
    e = (weights - top[owner]).exp()  # a softmax over each document's windows, stable
    share = e / e.new_zeros(documents).index_add(0, owner, e)[owner]
    return logits.new_zeros((documents, C)).index_add(0, owner, logits * share.unsqueeze(-1).to(logits.dtype))


class WindowAttention(nn.Module):
    """Attention pooling over a document's windows: a learned score ``w . h + b`` of each window's first-token
    vector ``h`` (its [CLS]), softmaxed over the document's windows, weights the windows' logits.

    It starts at zero (equal weights: mean pooling) and trains with the model. It lives on the model as
    ``model.window_pooler`` while bunmyaku uses it, and is saved beside the HF weights as
    ``window_pooling.safetensors`` (``weight`` (1, H), ``bias`` (1,)), so the model folder still loads in
    ``transformers`` as a per-window classifier.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        """(W, H) -> (W,) window scores."""
        return self.score(first_token.to(self.score.weight.dtype)).squeeze(-1)


def attach_pooler(model: nn.Module, folder: str | Path | None = None) -> WindowAttention:
    """Give ``model`` a :class:`WindowAttention` (``model.window_pooler``), loaded from ``folder`` when it holds
    one, else new; returns it."""
    from safetensors.torch import load_file

    hidden = model.config.hidden_size
    pooler = getattr(model, "window_pooler", None)
    if pooler is None:
        param = next(model.parameters())
        pooler = WindowAttention(hidden).to(param.device)
        model.window_pooler = pooler
    if folder is not None:
        path = Path(folder) / POOLER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the model was trained with window_pooling attention")
        state = load_file(str(path))
        pooler.score.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
    return pooler


def save_pooler(model: nn.Module, folder: str | Path) -> None:
    """Write ``model.window_pooler`` to ``folder/window_pooling.safetensors`` (through a temporary file)."""
    from safetensors.torch import save_file

    from bunmyaku.hub.files import atomic_path

    pooler = model.window_pooler
    state = {k: v.detach().float().cpu().contiguous() for k, v in pooler.score.state_dict().items()}
    with atomic_path(Path(folder) / POOLER_FILE) as tmp:
        save_file(state, str(tmp))


@contextlib.contextmanager
def without_pooler(model: nn.Module) -> Iterator[WindowAttention | None]:
    """Take ``model.window_pooler`` (if any) off the model for the block, so that the HF weights are saved without
    it; yields it (or None) and puts it back."""
    pooler = model._modules.pop("window_pooler", None)
    try:
        yield pooler
    finally:
        if pooler is not None:
            model.window_pooler = pooler


def window_logits(model: nn.Module, inputs: dict[str, torch.Tensor], owner: torch.Tensor, documents: int, mode: str):
    """Document logits (D, C) from a model run on the (W, T) windows of D documents (``owner`` (W,))."""
    if mode == "attention":
        out = model(**inputs, output_hidden_states=True)
        scores = model.window_pooler(out.hidden_states[-1][:, 0])
        return pool(out.logits, owner, documents, mode, scores)
    return pool(model(**inputs).logits, owner, documents, mode)
