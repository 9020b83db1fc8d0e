"""``bunmyaku.from_pretrained(..., compile=True)``: a compiled model gives the eager model's outputs."""

from __future__ import annotations

import shutil

import pytest
import torch

import bunmyaku
from bunmyaku.models.bert import BertConfig, BertModel


def test_compiled_equals_eager(tmp_path):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile's CPU backend needs a C compiler, and none is installed")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, max_seq_len=64)
    BertModel.from_config(config).save_pretrained(tmp_path)
    eager = bunmyaku.from_pretrained(tmp_path)
    compiled = bunmyaku.from_pretrained(tmp_path, compile=True)
    ids, mask = torch.randint(3, 99, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        expected = eager(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
