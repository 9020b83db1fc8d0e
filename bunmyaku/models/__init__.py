"""Models: one file per architecture, shared attention in ``attention.py`` and blocks in ``layers.py``."""

from bunmyaku.models.auto import from_pretrained, model_class
from bunmyaku.models.base import ModelOutput, PreTrainedModel

__all__ = ["ModelOutput", "PreTrainedModel", "from_pretrained", "model_class"]
