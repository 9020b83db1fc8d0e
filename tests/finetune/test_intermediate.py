"""Intermediate fine-tuning: ``init_from`` a model fine-tuned on another task keeps its encoder; the head is new
unless ``keep_head`` is given and fits."""

from __future__ import annotations

import logging

import pytest
import torch

from bunmyaku.models.auto import from_pretrained
from bunmyaku.training.plugins import Plugin
from tests.finetune.helpers import finetune, sentiment_rows

FAST = {"epochs": 1, "max_steps": 2, "batch_size": 4, "eval_split": 0.25}


class StartingWeights(Plugin):
    """Records the weights the Trainer starts from."""

    def on_fit_start(self, trainer) -> None:
        self.weights = {n: t.detach().clone() for n, t in trainer.unwrapped_model.state_dict().items()}


def _tsv(path, labels):
    rows = sentiment_rows(12)
    text = "".join(f"{t}\t{labels[i % len(labels)] if len(labels) > 2 else lab}\n" for i, (t, lab) in enumerate(rows))
    path.write_text("text\tlabel\n" + text)
    return str(path)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("intermediate")
    finetune(root / "a", model=str(tiny_bert_dir), train=_tsv(root / "two.tsv", ["pos", "neg"]), **FAST)
    weights = from_pretrained(root / "a" / "model", task="sequence-classification").state_dict()
    assert weights["head.classifier.weight"].shape[0] == 2
    return root, weights


def _start(out, caplog, **settings):
    recorder = StartingWeights()
    with caplog.at_level(logging.INFO, logger="bunmyaku.tasks.finetune"):
        finetune(out, callbacks=[recorder], **FAST, **settings)
    return recorder.weights


def _encoder(weights):
    return {n: t for n, t in weights.items() if n.startswith("backbone.")}


def test_other_labels_keep_the_encoder_and_get_a_new_head(run_a, caplog):
    root, a = run_a
    three = _tsv(root / "three.tsv", ["pos", "neg", "neutral"])
    start = _start(root / "b", caplog, init_from=str(root / "a" / "model"), train=three)
    encoder = _encoder(a)
    assert encoder and _encoder(start).keys() == encoder.keys()
    for name, tensor in encoder.items():
        assert torch.equal(start[name], tensor), name
    assert start["head.classifier.weight"].shape[0] == 3
    assert torch.equal(start["head.classifier.bias"], torch.zeros(3))  # a fresh head: zero biases
    assert "head re-initialised" in caplog.text and "another head or label set" in caplog.text
    # the run folder is accepted as well as its model/ folder
    again = _start(root / "b2", caplog, init_from=str(root / "a"), train=three)
    assert torch.equal(again["backbone.layers.1.mlp.fc_in.weight"], a["backbone.layers.1.mlp.fc_in.weight"])


def test_same_labels_keep_the_head_only_with_keep_head(run_a, caplog):
    root, a = run_a
    two = _tsv(root / "two-again.tsv", ["pos", "neg"])
    kept = _start(root / "c", caplog, init_from=str(root / "a" / "model"), train=two, keep_head=True)
    for name, tensor in a.items():
        assert torch.equal(kept[name], tensor), name
    caplog.clear()
    new = _start(root / "d", caplog, init_from=str(root / "a" / "model"), train=two)
    for name, tensor in _encoder(a).items():
        assert torch.equal(new[name], tensor), name
    assert not torch.equal(new["head.classifier.weight"], a["head.classifier.weight"])
    assert torch.equal(new["head.classifier.bias"], torch.zeros(2))
    assert "keep_head is off" in caplog.text


def test_keep_head_that_does_not_fit_and_bad_combinations_are_refused(run_a, tiny_bert_dir):
    root, _ = run_a
    three = _tsv(root / "three.tsv", ["pos", "neg", "neutral"])
    with pytest.raises(ValueError, match="keep_head.*labels"):
        finetune(root / "e", init_from=str(root / "a"), train=three, keep_head=True, **FAST)
    with pytest.raises(ValueError, match="one of model, init_from"):
        finetune(root / "f", model=str(tiny_bert_dir), init_from=str(root / "a"), train=three, **FAST)
    with pytest.raises(ValueError, match="give init_from"):
        finetune(root / "g", model=str(tiny_bert_dir), train=three, keep_head=True, **FAST)


def test_the_cli_chains_init_from_with_llrd_and_reinit(run_a):
    from typer.testing import CliRunner

    from bunmyaku.cli import app

    root, _ = run_a
    three = _tsv(root / "three.tsv", ["pos", "neg", "neutral"])
    args = ["finetune", "--init-from", root / "a" / "model", "--train", three, "--output-dir", root / "cli"]
    args += ["--eval-split", "0.25", "--max-steps", "2", "--batch-size", "4", "--llrd", "0.8", "--reinit-layers", "1"]
    args += ["--device", "cpu", "--no-progress", "--no-plot"]
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    model = from_pretrained(root / "cli" / "model", task="sequence-classification")
    assert len(model.config.id2label) == 3
    log = (root / "cli" / "finetune.log").read_text()
    assert "head re-initialised" in log and "Layer-wise lr decay 0.8" in log and "Re-initialised the top 1" in log
