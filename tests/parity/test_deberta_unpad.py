"""DeBERTa's unpadded path (``config.unpad``): a right-padded ragged batch packed into its real tokens, attention
row group by row group (or the whole batch re-padded), equals the padded batch and ``transformers`` at real
positions, every loss is HF's, and so are the gradients; ``torch.compile`` runs it and equals eager."""

from __future__ import annotations

import shutil

import pytest
import torch

import bunmyaku
from bunmyaku.models import deberta, fastpath
from tests.conftest import require_module
from tests.parity.helpers import assert_close, save
from tests.parity.test_deberta import VOCAB, _hf_model, assert_training_gradients_match

transformers = require_module("transformers")

LENGTHS = [20, 9, 4, 20, 16]  # with GROUP_MIN_LENGTH 2: groups {20, 20, 16} (padded), {9}, {4}


def _ragged(lengths=LENGTHS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(3, VOCAB, (len(lengths), T), generator=gen) * mask
    types = (torch.arange(T)[None] >= 6).long().expand(len(lengths), T) * mask
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types), mask


@pytest.fixture(params=["row-groups", "whole-batch"])
def route(request, monkeypatch):
    """Row groups (CPU's route for widely spread lengths) or the whole batch re-padded (CUDA's, compile's)."""
    monkeypatch.setattr(fastpath, "GROUP_MIN_LENGTH", 2 if request.param == "row-groups" else 10_000)
    mask = _ragged()[1]
    groups = deberta.PackedRows.from_mask(mask, deberta.DebertaV2Config(relative_attention=True)).groups
    assert len(groups) == (3 if request.param == "row-groups" else 1)  # the route the test names is the one taken
    return request.param


@pytest.mark.parametrize("name", ["v3", "v3-proj", "v2-xlarge", "v2-p2c", "v1-base", "v1-clamped"])
def test_unpadded_equals_padded_and_transformers(tmp_path, route, name):
    hf_model = _hf_model(name, "base", seed=3)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    assert model.config.unpad
    inputs, mask = _ragged(seed=1)
    with torch.no_grad():
        expected = hf_model(**inputs, output_hidden_states=True)
        unpadded = model(**inputs, output_hidden_states=True)
        padded = model(**inputs, output_hidden_states=True, unpad=False)
    assert_close(unpadded.last_hidden_state, expected.last_hidden_state, mask)
    assert_close(unpadded.last_hidden_state, padded.last_hidden_state, mask)
    for ours, theirs in zip(unpadded.hidden_states, expected.hidden_states, strict=True):
        assert_close(ours, theirs, mask)
    # the unpadded path leaves padding at zero (the padded one computes HF's values there)
    assert unpadded.last_hidden_state[mask == 0].abs().max() == 0
    assert_close(padded.last_hidden_state, expected.last_hidden_state)


def _ragged_loss_cases(mask: torch.Tensor):
    gen = torch.Generator().manual_seed(0)
    B, T = mask.shape
    tags = torch.randint(0, 5, (B, T), generator=gen)
    scored = torch.rand(B, T, generator=gen) < 0.5
    return [
        ("masked-lm", {}, {"labels": tags.masked_fill(~scored | (mask == 0), -100)}),  # real positions: unpadded
        ("masked-lm", {}, {"labels": tags.masked_fill(~scored, -100)}),  # some at padding: runs padded
        ("token-classification", {"num_labels": 5}, {"labels": tags.masked_fill(mask == 0, -100)}),
        ("token-classification", {"num_labels": 5}, {"labels": tags}),
        ("question-answering", {}, {"start_positions": torch.tensor([1, 3, 2, 19, 7]), "end_positions": tags[:, 0]}),
        ("sequence-classification", {"num_labels": 3}, {"labels": torch.tensor([0, 2, 1, -1, 2])}),
        ("sequence-classification", {"num_labels": 1}, {"labels": torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0])}),
        ("multiple-choice", {}, {"labels": torch.tensor([1, 0])}),
    ]


@pytest.mark.parametrize("name", ["v3", "v2-xlarge"])
def test_every_head_loss_matches_transformers_unpadded(tmp_path, route, name):
    """Losses of every head on a ragged batch (QA and labels at padding run padded; the rest unpadded)."""
    inputs, mask = _ragged(seed=4)
    T = mask.size(1)
    for i, (task, extra, labels) in enumerate(_ragged_loss_cases(mask)):
        batch = {k: v[:4].reshape(2, 2, T) for k, v in inputs.items()} if task == "multiple-choice" else inputs
        hf_model = _hf_model(name, task, seed=i, **{"num_labels": 2, **extra})
        model = bunmyaku.from_pretrained(save(hf_model, tmp_path / str(i)))
        with torch.no_grad():
            ours, theirs = model(**batch, **labels).loss, hf_model(**batch, **labels).loss
        assert torch.isfinite(ours), (task, extra)
        assert_close(ours, theirs)


@pytest.mark.parametrize("name", ["v3", "v2-xlarge", "v1-base"])
def test_unpadded_gradients_match_transformers(tmp_path, route, name):
    """Train mode without dropout, unpadded (sequence classification) and with labels at real positions only
    (token classification): every parameter's gradient is HF's, with gradient checkpointing too."""
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    inputs, mask = _ragged(seed=5)
    B, T = mask.shape
    cases = [
        ("sequence-classification", {"num_labels": 3}, torch.tensor([1, 0, 2, 2, 1])),
        ("token-classification", {"num_labels": 5}, torch.randint(0, 5, (B, T)).masked_fill(mask == 0, -100)),
    ]
    for task, extra, labels in cases:
        hf_model = _hf_model(name, task, seed=8, **no_dropout, **extra).train()
        model = bunmyaku.from_pretrained(save(hf_model, tmp_path / task))
        assert_training_gradients_match(model, hf_model, inputs, labels)


def test_left_padding_runs_padded(tmp_path):
    """Packing keeps relative distances only for right padding: a left-padded batch runs padded, equal to HF."""
    assert not deberta.right_padded(torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert not deberta.right_padded(torch.tensor([[1, 0, 1], [1, 1, 1]]))
    assert deberta.right_padded(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    hf_model = _hf_model("v3", "base", seed=2)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    inputs, mask = _ragged(seed=2)
    inputs = {k: v.flip(-1) for k, v in inputs.items()}
    with torch.no_grad():
        assert_close(model(**inputs).last_hidden_state, hf_model(**inputs).last_hidden_state, mask.flip(-1))


@pytest.mark.slow  # inductor's CPU compile of forward + backward: minutes on a loaded 2-core machine
def test_compiled_training_equals_eager():
    """torch.compile of a DeBERTa (v3 shape) forward and backward on a ragged batch: eager's loss and gradients
    (under compile the batch takes the whole-batch route: a graph keeps one padded batch, not per-batch groups)."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile's CPU backend needs a C compiler, and none is installed")
    config = deberta.DebertaV2Config(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, max_seq_len=64,
        relative_attention=True, position_buckets=8, max_relative_positions=16, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type="p2c|c2p", position_biased_input=False, type_vocab_size=0,
        dropout=0.0, attention_dropout=0.0, id2label={0: "a", 1: "b", 2: "c"},
    )  # fmt: skip
    torch.manual_seed(0)
    eager = deberta.DebertaV2ForSequenceClassification.from_config(config).train()
    compiled = deberta.DebertaV2ForSequenceClassification.from_config(config).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    inputs, _ = _ragged([9, 4, 7], seed=6)
    labels = torch.tensor([0, 2, 1])
    losses = []
    for model in (eager, compiled):
        loss = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
