"""Tiny pretrained-model folders shared by the fine-tuning tests."""

from __future__ import annotations

import pytest

from tests.finetune.helpers import save_tiny


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")
