"""``torch.compile``: a compiled model gives the eager model's outputs, and in training its gradients."""

from __future__ import annotations

import shutil

import pytest
import torch

import bunmyaku
from bunmyaku.models.bert import BertConfig, BertForSequenceClassification, BertModel


def _needs_compiler():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile's CPU backend needs a C compiler, and none is installed")


def test_compiled_equals_eager(tmp_path):
    _needs_compiler()
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


def test_compiled_training_on_ragged_batches_equals_eager():
    """The unpadded training path (packing, then attention row by row) under torch.compile: same loss and
    gradients as eager, over batches of different lengths (a new token count recompiles once, as dynamic)."""
    _needs_compiler()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, max_seq_len=64,
        dropout=0.0, attention_dropout=0.0, id2label={0: "a", 1: "b", 2: "c"},
    )  # fmt: skip
    eager = BertForSequenceClassification.from_config(config).train()
    compiled = BertForSequenceClassification.from_config(config).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    for lengths in ([9, 4, 7], [12, 3, 12], [5, 11, 2]):
        T = max(lengths)
        ids = torch.randint(3, 99, (3, T))
        mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
        labels = torch.tensor([0, 2, 1])
        losses = []
        for model in (eager, compiled):
            model.zero_grad()
            loss = model(input_ids=ids * mask, attention_mask=mask, labels=labels).loss
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
