"""Multi-sample dropout: the training loss is the mean of N losses under N dropout masks, equal to the head
written out here with the same random stream (and so are the gradients); evaluation is the plain head; the
Trainer's accumulated gradient is the full batch's; a fine-tuned model with it (and SWA) loads in `transformers`
unchanged; the flags reach the CLI and the Python API; bad values and heads without a classifier are refused."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import bunmyaku
from bunmyaku.cli import app
from bunmyaku.models.bert import (
    BertConfig,
    BertForMultipleChoice,
    BertForSequenceClassification,
    BertForTokenClassification,
)
from bunmyaku.models.gpt2 import GPT2Config, GPT2ForSequenceClassification
from bunmyaku.models.roberta import RobertaConfig, RobertaForSequenceClassification
from bunmyaku.tasks.finetune import FinetuneArgs
from bunmyaku.training import Plugin, Trainer
from bunmyaku.training.plugins import MultiSampleDropout
from tests.conftest import require_module
from tests.finetune.helpers import sentiment_rows
from tests.training.helpers import Plan
from tests.training.test_adversarial import _args

P, N, B, T = 0.3, 4, 4, 7  # head dropout, samples, rows, tokens
TINY = dict(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=40, dropout=0.0)
KINDS = ["single-label", "regression", "multi-label", "token", "choice", "roberta"]


def _model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    labels = {"regression": 1, "choice": 2}.get(kind, 3)
    config = dict(TINY, attention_dropout=0.0, classifier_dropout=P, id2label={i: str(i) for i in range(labels)})
    if kind == "roberta":
        return RobertaForSequenceClassification.from_config(RobertaConfig(**config))
    heads = {"token": BertForTokenClassification, "choice": BertForMultipleChoice}
    cls = heads.get(kind, BertForSequenceClassification)
    if kind == "multi-label":
        config["problem_type"] = "multi_label_classification"
    return cls.from_config(BertConfig(**config))


def _batch(kind: str, rows: int = B, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, 2, T) if kind == "choice" else (rows, T)
    ids = torch.randint(5, 99, shape, generator=gen)
    labels = {
        "single-label": torch.randint(0, 3, (rows,), generator=gen),
        "roberta": torch.randint(0, 3, (rows,), generator=gen),
        "regression": torch.rand(rows, generator=gen),
        "multi-label": torch.randint(0, 2, (rows, 3), generator=gen).float(),
        "token": torch.randint(0, 3, (rows, T), generator=gen),
        "choice": torch.randint(0, 2, (rows,), generator=gen),
    }[kind]
    if kind == "token":
        labels[:, 0] = -100  # positions not scored
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _reference(kind: str, model, batch, samples: int):
    """The head written out: ``samples`` passes of dropout + classifier, the losses averaged (Inoue 2019)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if kind == "choice":
        ids, mask = ids.flatten(0, 1), mask.flatten(0, 1)
    out = model.backbone(input_ids=ids, attention_mask=mask)  # no dropout in the encoder: no random numbers drawn
    head = model.head.classifier
    all_logits, losses = [], []
    for _ in range(samples):
        if kind == "roberta":
            x = torch.tanh(F.linear(F.dropout(out.last_hidden_state[:, 0], P), head.dense.weight, head.dense.bias))
            logits = F.linear(F.dropout(x, P), head.out_proj.weight, head.out_proj.bias)
        else:
            x = out.last_hidden_state if kind == "token" else out.pooler_output
            logits = F.linear(F.dropout(x, P), head.weight, head.bias)
        if kind == "choice":
            logits = logits.view(-1, 2)
        if kind == "regression":
            loss = ((logits.squeeze(-1) - labels) ** 2).mean()
        elif kind == "multi-label":
            loss = F.binary_cross_entropy_with_logits(logits, labels)
        else:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        all_logits.append(logits)
        losses.append(loss)
    return torch.stack(all_logits).mean(0), sum(losses) / samples


@pytest.mark.parametrize("kind", KINDS)
def test_training_loss_and_gradients_equal_n_passes_of_the_head(kind):
    model = _model(kind).train()
    model.multi_sample_dropout = N
    batch = _batch(kind)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(7)
    out = model(**batch)
    torch.manual_seed(7)
    ref_logits, ref_loss = _reference(kind, model, batch, N)
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.logits, ref_logits, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        if r is None:  # the pooler of a RoBERTa / token head, unused either way
            assert g is None, name
            continue
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4, msg=name)
    embed = names.index("backbone.embed.tokens.weight")
    assert grads[embed].abs().sum() > 0, "the gradient reaches the encoder"
    torch.manual_seed(7)
    model.multi_sample_dropout = 1
    _, one_loss = _reference(kind, model, batch, 1)
    assert not torch.allclose(one_loss, ref_loss), "the N samples matter"


@pytest.mark.parametrize("kind", KINDS)
def test_evaluation_is_the_plain_head(kind):
    model = _model(kind).eval()
    batch = _batch(kind)
    calls = []
    model.head.classifier.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        plain = model(**batch)
        model.multi_sample_dropout = N
        many = model(**batch)
    assert torch.equal(plain.logits, many.logits) and torch.equal(plain.loss, many.loss)
    assert len(calls) == 2, "one pass of the head each time: dropout is the identity in eval mode"


class Grads(Plugin):
    def before_optimizer_step(self, trainer):
        self.grads = {n: p.grad.clone() for n, p in trainer.unwrapped_model.named_parameters() if p.grad is not None}


class Rows:
    """Fine-tuning's objective contract (TaskObjective): the mean loss times the rows, counted in rows."""

    def count(self, batch):
        return {"task": len(batch["labels"])}

    def __call__(self, model, batch):
        return {"task": model(**batch).loss * len(batch["labels"])}, {}


@pytest.mark.parametrize("accumulation", [4, 1])
def test_the_trainer_accumulates_the_full_batch_gradient(tmp_path, accumulation):
    full = _batch("single-label")
    micro = [{k: v[i : i + 1] for k, v in full.items()} for i in range(B)] if accumulation == 4 else [full]
    grads = Grads()
    model = _model("single-label")
    args = _args(tmp_path, max_steps=1, grad_accum_steps=accumulation, seed=5)
    Trainer(model, args, Plan(micro), objective=Rows(), plugins=[grads, MultiSampleDropout(N)], export_dir=None).fit()
    reference = _model("single-label").train()
    torch.manual_seed(5)  # the Trainer's seed: the same dropout masks, drawn micro-batch by micro-batch
    loss = sum(_reference("single-label", reference, b, N)[1] * len(b["labels"]) for b in micro) / B
    loss.backward()
    for name, param in reference.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(grads.grads[name], param.grad, atol=1e-6, rtol=1e-4, msg=name)
    assert model.multi_sample_dropout == N


def test_finetune_with_it_and_swa_exports_a_plain_transformers_model(tmp_path, tiny_bert_dir):
    transformers = require_module("transformers")
    rows = [{"text": t, "label": lab} for t, lab in sentiment_rows(16)]
    held = [{"text": t, "label": lab} for t, lab in sentiment_rows(8, seed=1)]
    settings = dict(task="text-classification", model=str(tiny_bert_dir), train=rows, eval=held, epochs=2)
    settings.update(batch_size=4, max_length=32, progress=False, plot=False, device="cpu", log_every=1)
    result = bunmyaku.finetune(output_dir=tmp_path / "run", multi_sample_dropout=3, swa_start=1.0, **settings)
    plain = bunmyaku.finetune(**settings)
    assert result.history[0]["loss"] != plain.history[0]["loss"], "the first step's loss is a 3-sample mean"
    exported = tmp_path / "run" / "model"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(exported).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    batch = tokenizer([r["text"] for r in held], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch).logits, result.model(**batch).logits, atol=1e-5, rtol=1e-4)
    assert result.model.state_dict().keys() == plain.model.state_dict().keys()  # no new weights


def test_cli_flags_and_recipe_keys():
    runner = CliRunner()
    for verb, expected, absent in (
        ("finetune", ["--swa-start", "--multi-sample-dropout"], []),
        ("cv", ["--swa-start", "--multi-sample-dropout"], []),
        ("pretrain", ["--swa-start"], ["--multi-sample-dropout"]),
    ):
        result = runner.invoke(app, [verb, "--help"], env={"COLUMNS": "240", "TERMINAL_WIDTH": "240"})
        assert result.exit_code == 0, result.output
        for flag in expected:
            assert flag in result.output, (verb, flag)
        for flag in absent:
            assert flag not in result.output, (verb, flag)
    for function in (bunmyaku.finetune, bunmyaku.cv):  # the Python twins take them as keywords, same defaults
        parameters = __import__("inspect").signature(function).parameters
        assert parameters["swa_start"].default == 0.0 and parameters["multi_sample_dropout"].default == 1


def test_bad_values_and_heads_without_a_classifier_are_refused(tiny_bert_dir):
    for value in (0, -1, 2.5, float("nan"), True, "3"):
        with pytest.raises(ValueError, match="multi_sample_dropout"):
            FinetuneArgs(multi_sample_dropout=value)
    with pytest.raises(ValueError, match="bi-encoder"):
        FinetuneArgs(task="sentence-similarity", encoder="bi", multi_sample_dropout=2)
    with pytest.raises(ValueError, match="question-answering"):
        FinetuneArgs(task="question-answering", multi_sample_dropout=2)
    FinetuneArgs(task="sentence-similarity", encoder="cross", multi_sample_dropout=2)  # a classifier: accepted
    gpt2 = GPT2ForSequenceClassification.from_config(GPT2Config(**{**TINY, "max_seq_len": 32}))
    with pytest.raises(ValueError, match="GPT2ForSequenceClassification has none"):
        MultiSampleDropout(2).on_fit_start(types.SimpleNamespace(unwrapped_model=gpt2))
    with pytest.raises(ValueError, match=r"swa_start \(3\) must be below epochs \(2\)"):
        bunmyaku.finetune(model=str(tiny_bert_dir), train=[{"text": "a", "label": "b"}], epochs=2, swa_start=3)
