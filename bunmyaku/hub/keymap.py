"""Renaming tensors between Hugging Face checkpoint names and bunmyaku module names.

A key map is a dict from a HF name to ours; ``{}`` stands for a layer index and ``None`` marks a
tensor that is dropped on purpose (a buffer, or a weight tied to another one)::

    BERT_FROM_HF = {
        "embeddings.word_embeddings.weight": "embed.tokens.weight",
        "encoder.layer.{}.attention.self.query.weight": "layers.{}.attn.q_proj.weight",
        "embeddings.position_ids": None,
    }

The same map is used in both directions, so loading and saving cannot drift apart. Tensor
transforms (transposes, splits) are not a key map's business: each architecture does them in a
named function before or after renaming.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_DROP = object()


def _compile(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


@dataclass
class KeyMap:
    """A bidirectional renaming between HF tensor names and ours.

    Args:
        from_hf: HF name template -> our name template, or ``None`` for a tensor dropped on purpose.
    """

    from_hf: dict[str, str | None]
    _exact: dict[str, str | None] = field(init=False, repr=False)
    _patterns: list[tuple[re.Pattern[str], str | None]] = field(init=False, repr=False)
    _reverse_exact: dict[str, str] = field(init=False, repr=False)
    _reverse_patterns: list[tuple[re.Pattern[str], str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._exact, self._patterns, self._reverse_exact, self._reverse_patterns = {}, [], {}, []
        for hf, ours in self.from_hf.items():
            if "{}" in hf:
                self._patterns.append((_compile(hf), ours))
                if ours is not None:
                    self._reverse_patterns.append((_compile(ours), hf))
            else:
                self._exact[hf] = ours
                if ours is not None:
                    self._reverse_exact[ours] = hf

    @staticmethod
    def _lookup(key, exact, patterns):
        if key in exact:
            return exact[key]
        for pattern, target in patterns:
            m = pattern.match(key)
            if m:
                if target is None:
                    return None
                for idx in m.groups():
                    target = target.replace("{}", idx, 1)
                return target
        return _DROP

    def to_ours(self, hf_key: str) -> str | None:
        """Our name for a HF tensor; ``None`` if dropped on purpose. Raises ``KeyError`` if unmapped."""
        out = self._lookup(hf_key, self._exact, self._patterns)
        if out is _DROP:
            raise KeyError(hf_key)
        return out

    def to_hf(self, our_key: str) -> str:
        """The HF name for one of our tensors. Raises ``KeyError`` if unmapped."""
        out = self._lookup(our_key, self._reverse_exact, self._reverse_patterns)
        if out is _DROP:
            raise KeyError(our_key)
        return out

    def knows_hf(self, hf_key: str) -> bool:
        """Whether ``hf_key`` is mapped (renamed or dropped on purpose)."""
        return self._lookup(hf_key, self._exact, self._patterns) is not _DROP


def linear_map(hf: str, ours: str) -> dict[str, str]:
    """A linear layer's weight and bias under both names: ``linear_map("classifier", "head.classifier")``."""
    return {f"{hf}.weight": f"{ours}.weight", f"{hf}.bias": f"{ours}.bias"}
