"""Zero-shot classification with an NLI model: any labels, no training for them.

Yin et al. (2019), "Benchmarking Zero-shot Text Classification": each candidate label becomes a hypothesis
("This example is sports.") and the NLI model judges whether the text entails it. With one label per text
(the default), the entailment logits are compared across labels by a softmax; with ``multi_label``, each
label is scored on its own, by a softmax of its entailment logit against its contradiction logit. This is
the algorithm of transformers' ``zero-shot-classification`` pipeline, so the scores agree with it.
"""

from __future__ import annotations

import logging
from typing import Any

from bunmyaku.pipelines.classification import TextClassificationPipeline

logger = logging.getLogger(__name__)


class ZeroShotClassificationPipeline(TextClassificationPipeline):
    """Score candidate labels for texts with an NLI (entailment) sequence-classification model.

    The model's ``id2label`` must name an entailment label (one starting with "entail", e.g. ``ENTAILMENT``);
    the contradiction label is the one starting with "contradict", else (as in transformers) the first label,
    or the last when the first is entailment.

    Args:
        model: a folder (or hub id) with an NLI sequence-classification checkpoint (MNLI, XNLI, ...).
        device: where to run; default CUDA when available.
        batch_size: (text, hypothesis) pairs per forward pass.
        max_length: token limit per pair (the text is truncated, never the hypothesis); default the model's.
    """

    def __init__(self, model, device: str | None = None, batch_size: int = 32, max_length: int | None = None):
        super().__init__(model, device, batch_size=batch_size, max_length=max_length)
        names = {i: str(name).lower() for i, name in self.labels.items()}
        entailment = [i for i, name in names.items() if name.startswith("entail")]
        if not entailment:
            # transformers falls back to the last label with a warning; results are then likely meaningless
            logger.warning(
                "%s: no label of id2label %s starts with 'entail'; using the last label as entailment. "
                "Set id2label in config.json to the NLI labels.",
                self.name,
                list(self.labels.values()),
            )
        self.entailment_id = entailment[0] if entailment else len(self.labels) - 1
        contradiction = [i for i, name in names.items() if name.startswith("contradict")]
        self.contradiction_id = (
            contradiction[0] if contradiction else (len(self.labels) - 1 if self.entailment_id == 0 else 0)
        )

    def __call__(
        self,
        sequences: str | list[str],
        candidate_labels: str | list[str],
        hypothesis_template: str = "This example is {}.",
        multi_label: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Rank ``candidate_labels`` for a text (or each text of a list).

        Args:
            sequences: a text or a list of texts.
            candidate_labels: the labels: a list, or one string of comma-separated labels.
            hypothesis_template: the hypothesis each label fills in at ``{}``.
            multi_label: score each label independently (several can be true) instead of one softmax over them.

        Returns:
            Per text ``{"sequence", "labels", "scores"}`` with the labels best first; a list of those for a list.

        Raises:
            ValueError: for no labels, no texts, or a template without ``{}``.
        """
        labels = _parse_labels(candidate_labels)
        texts = [sequences] if isinstance(sequences, str) else list(sequences)
        if not labels or not texts:
            raise ValueError("give at least one candidate label and at least one text")
        if hypothesis_template.format(labels[0]) == hypothesis_template:
            raise ValueError(
                f"hypothesis_template {hypothesis_template!r} has no {{}} for the label; e.g. 'This example is {{}}.'"
            )
        hypotheses = [hypothesis_template.format(label) for label in labels]
        premises = [text for text in texts for _ in labels]
        logits = self.logits(premises, hypotheses * len(texts), truncation="only_first").view(
            len(texts), len(labels), -1
        )  # (N, labels, NLI classes)
        if multi_label or len(labels) == 1:
            pair = logits[..., [self.contradiction_id, self.entailment_id]]
            scores = pair.softmax(-1)[..., 1]
        else:
            scores = logits[..., self.entailment_id].softmax(-1)
        results = []
        for text, row in zip(texts, scores, strict=True):
            order = row.argsort(descending=True).tolist()
            results.append({"sequence": text, "labels": [labels[i] for i in order], "scores": row[order].tolist()})
        return results[0] if isinstance(sequences, str) else results


def _parse_labels(candidate_labels: str | list[str]) -> list[str]:
    if isinstance(candidate_labels, str):
        return [label.strip() for label in candidate_labels.split(",") if label.strip()]
    return list(candidate_labels)
