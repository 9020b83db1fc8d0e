"""Pipelines: a model and its tokenizer behind one call that takes text and returns plain Python data.

``bunmyaku.pipeline(task, model=..., device=...)`` picks the pipeline for a task name.
"""

from __future__ import annotations

import importlib
from typing import Any

# task -> (module, class)
PIPELINES = {
    "sentence-similarity": ("bunmyaku.pipelines.similarity", "SentenceSimilarityPipeline"),
    "fill-mask": ("bunmyaku.pipelines.fill_mask", "FillMaskPipeline"),
    "text-generation": ("bunmyaku.pipelines.text_generation", "TextGenerationPipeline"),
    "text-classification": ("bunmyaku.pipelines.classification", "TextClassificationPipeline"),
    "token-classification": ("bunmyaku.pipelines.token_classification", "TokenClassificationPipeline"),
    "question-answering": ("bunmyaku.pipelines.question_answering", "QuestionAnsweringPipeline"),
    "translation": ("bunmyaku.pipelines.translation", "TranslationPipeline"),
    "feature-extraction": ("bunmyaku.pipelines.feature_extraction", "FeatureExtractionPipeline"),
    "zero-shot-classification": ("bunmyaku.pipelines.zero_shot", "ZeroShotClassificationPipeline"),
}
# transformers' other names for the same tasks, so pasted HF code keeps working
TASK_ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification"}


def pipeline(task: str, model: str, device: str | None = None, **kwargs: Any):
    """Build the pipeline for ``task`` around the model folder (or hub id) ``model``.

    Args:
        task: one of ``PIPELINES``, or an alias from ``TASK_ALIASES`` (``"sentiment-analysis"``, ``"ner"``).
        model: a model folder in HF layout (or a hub repo id, or a GGUF file for generation).
        device: "cpu", "cuda", ... (default: CUDA when available).
        kwargs: passed to the pipeline class.
    """
    task = TASK_ALIASES.get(task, task)
    if task not in PIPELINES:
        raise ValueError(f"unknown pipeline task {task!r}; available: {sorted([*PIPELINES, *TASK_ALIASES])}")
    module, name = PIPELINES[task]
    return getattr(importlib.import_module(module), name)(model, device=device, **kwargs)


def default_device(device: str | None) -> str:
    """The requested device, or CUDA when available, else CPU."""
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
