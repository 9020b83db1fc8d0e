"""Stochastic weight averaging: the evaluated and exported weights are the plain mean of the iterates recorded
from the start epoch on (written out in the test), gradient accumulation and resuming change nothing, a step the
fp16 GradScaler skips is not counted twice, bad values are refused."""

from __future__ import annotations

import pytest
import torch

import bunmyaku
from bunmyaku.training import Plugin, TrainArgs, Trainer
from bunmyaku.training.plugins import SWA
from bunmyaku.training.recipe import build_args
from tests.training.helpers import Plan, tiny_gpt2
from tests.training.test_adversarial import EPS, LR, _args, _batches, _loss


class Record(Plugin):
    """The trainable weights after every optimizer step (its 1-based number: the weights it left), and the weights
    each evaluation saw."""

    def __init__(self):
        self.iterates, self.evaluated = {}, []

    def after_optimizer_step(self, trainer):  # trainer.step is counted after the hooks
        weights = {n: p.detach().clone() for n, p in trainer.unwrapped_model.named_parameters()}
        self.iterates[trainer.step + 1] = weights

    def evaluate(self, trainer):  # the Trainer's evaluation callable: runs inside the plugins' evaluation contexts
        self.evaluated.append({n: p.detach().clone() for n, p in trainer.unwrapped_model.named_parameters()})
        return {"loss": 0.0}


def _mean(iterates, steps):
    return {n: torch.stack([iterates[s][n] for s in steps]).mean(0) for n in iterates[steps[0]]}


def _run(tmp_path, batches, plugins=(), checkpoint=False, export=False, **kwargs):
    model = tiny_gpt2()
    record = Record()
    trainer = Trainer(
        model,
        _args(tmp_path, **kwargs),
        Plan(batches),
        plugins=[record, *plugins],
        export_dir=tmp_path / "export" if export else None,
        checkpoint_at_end=checkpoint,
        evaluate=record.evaluate,
    )
    trainer.fit()
    (swa,) = [p for p in trainer.plugins if isinstance(p, SWA)]
    return trainer, model, record, swa


def _assert_close(a, b, **tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tol)


def test_evaluation_and_export_use_the_mean_of_the_iterates_from_the_start_epoch(tmp_path):
    # 2 batches per epoch, 6 steps = 3 epochs; from epoch 1 on: steps 3, 4, 5, 6 (the 3rd step is epoch 1's first)
    batches = _batches(2, 2)
    trainer, model, record, swa = _run(tmp_path, batches, export=True, max_steps=6, swa_start=1.0, eval_every=2)
    expected = _mean(record.iterates, [3, 4, 5, 6])
    assert swa.count == 4
    _assert_close(swa.average, expected, atol=1e-7, rtol=1e-6)
    # evaluations at steps 2 (nothing averaged yet: the plain weights), 4 (mean of steps 3-4) and 6
    _assert_close(record.evaluated[0], record.iterates[2], atol=0, rtol=0)
    _assert_close(record.evaluated[1], _mean(record.iterates, [3, 4]), atol=1e-7, rtol=1e-6)
    _assert_close(record.evaluated[2], expected, atol=1e-7, rtol=1e-6)
    # training goes on from the last iterate (the average is not written back into the model)
    _assert_close(dict(model.named_parameters()), record.iterates[6], atol=0, rtol=0)
    exported = dict(bunmyaku.from_pretrained(tmp_path / "export").named_parameters())
    _assert_close(exported, expected, atol=1e-7, rtol=1e-6)
    last = record.iterates[6]
    assert any(not torch.allclose(expected[n], last[n], atol=1e-5) for n in last), "the average is not the last step"


def test_accumulation_four_by_one_equals_one_by_four(tmp_path):
    micro = _batches(4, 1)
    full = {k: torch.cat([b[k] for b in micro]) for k in micro[0]}
    # one optimizer step per epoch either way: 4 steps, averaged from epoch 2 on (steps 3 and 4)
    _, _, _, accumulated = _run(tmp_path / "a", micro, grad_accum_steps=4, max_steps=4, swa_start=2.0)
    _, _, record, whole = _run(tmp_path / "b", [full], max_steps=4, swa_start=2.0)
    assert accumulated.count == whole.count == 2
    _assert_close(accumulated.average, whole.average, atol=2e-6, rtol=1e-5)
    _assert_close(whole.average, _mean(record.iterates, [3, 4]), atol=1e-7, rtol=1e-6)


class GroupRates(Plugin):
    def __init__(self):
        self.rates = {}

    def before_optimizer_step(self, trainer):
        self.rates[trainer.step + 1] = [g["lr"] for g in trainer.optimizer.param_groups]


def test_swa_lr_is_constant_from_the_start_epoch_like_a_plain_adamw_loop(tmp_path):
    batches = _batches(2, 2)
    rates = GroupRates()
    trainer, _, _, swa = _run(
        tmp_path,
        batches,
        plugins=[rates],
        max_steps=6,
        swa_start=1.0,
        swa_lr=3e-2,
        schedule="linear",
        min_lr_ratio=0.0,
        log_every=1,
    )
    # plain PyTorch: AdamW at the linear schedule's rate for steps 1-2 (of 6, no warmup), then 3e-2 for steps 3-6
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    iterates = {}
    for step in range(6):
        opt.param_groups[0]["lr"] = 3e-2 if step >= 2 else LR * (1 - step / 6)
        opt.zero_grad()
        _loss(model, batches[step % 2]).backward()
        opt.step()
        iterates[step + 1] = {n: p.detach().clone() for n, p in model.named_parameters()}
    _assert_close(swa.average, _mean(iterates, [3, 4, 5, 6]), atol=1e-6, rtol=1e-5)
    assert [r[0] for r in rates.rates.values()] == pytest.approx([LR, LR * 5 / 6, 3e-2, 3e-2, 3e-2, 3e-2])
    logged = [r["lr"] for r in trainer.history if "loss" in r]  # each step's record: the next step's rate
    assert logged[1:] == pytest.approx([3e-2] * 5)
    # with layer-wise decay every group keeps its factor under the SWA rate
    rates = GroupRates()
    _run(tmp_path / "llrd", batches, plugins=[rates], max_steps=4, swa_start=1.0, swa_lr=3e-2, llrd=0.5)
    # 2 layers: head and top layer x1, layer 0 x0.5, embeddings x0.25
    assert {round(r, 12) for r in rates.rates[3]} == {round(3e-2 * f, 12) for f in (1.0, 0.5, 0.25)}
    assert {round(r, 12) for r in rates.rates[2]} == {round(LR * f, 12) for f in (1.0, 0.5, 0.25)}  # before: LR


def test_checkpoint_and_resume_mid_average_give_identical_weights(tmp_path):
    batches = _batches(2, 2)
    settings = dict(max_steps=6, swa_start=1.0, swa_lr=2e-2)  # constant schedule: a shorter run is a killed one
    _, _, _, whole = _run(tmp_path / "whole", batches, export=True, **settings)
    # killed after 4 steps (2 of them averaged), then resumed to 6
    _run(tmp_path / "cut", batches, checkpoint=True, **{**settings, "max_steps": 4})
    _, _, _, resumed = _run(tmp_path / "cut", batches, export=True, resume=True, **settings)
    assert resumed.count == whole.count == 4
    _assert_close(resumed.average, whole.average, atol=0, rtol=0)
    a = bunmyaku.from_pretrained(tmp_path / "whole" / "export").state_dict()
    b = bunmyaku.from_pretrained(tmp_path / "cut" / "export").state_dict()
    _assert_close(a, b, atol=0, rtol=0)


class InjectInf(Plugin):
    def __init__(self, step):
        self.step = step

    def before_optimizer_step(self, trainer):
        if trainer.step + 1 == self.step:
            trainer.unwrapped_model.get_input_embeddings().weight.grad[0, 0] = float("inf")


def test_an_fp16_step_skipped_by_the_scaler_is_not_averaged_twice(tmp_path):
    batches = _batches(2, 2)
    _, _, record, swa = _run(tmp_path, batches, plugins=[InjectInf(4)], precision="fp16", max_steps=6, swa_start=1.0)
    _assert_close(record.iterates[4], record.iterates[3], atol=0, rtol=0)  # the scaler skipped step 4
    assert swa.count == 3
    _assert_close(swa.average, _mean(record.iterates, [3, 5, 6]), atol=1e-7, rtol=1e-6)


def test_flags_recipe_keys_and_bad_values(tmp_path):
    (args,) = build_args((TrainArgs,), {"swa_start": 1.5})  # a recipe key
    (swa,) = Trainer(tiny_gpt2(), args, Plan([])).plugins
    assert isinstance(swa, SWA) and swa.start == 1.5
    for value in (-1.0, float("nan"), float("inf"), "1e-3", True):
        with pytest.raises(ValueError, match="swa_start"):
            _args(tmp_path, swa_start=value)
    for value in (-1e-3, float("nan")):
        with pytest.raises(ValueError, match="swa_lr"):
            _args(tmp_path, swa_start=1.0, swa_lr=value)
    with pytest.raises(ValueError, match="give swa_start too"):
        _args(tmp_path, swa_lr=1e-3)
    with pytest.raises(ValueError, match="swa_start and ema_decay"):
        _args(tmp_path, swa_start=1.0, ema_decay=0.99)
    # 2 batches per epoch, 4 steps: the last step runs in epoch 1.5, so averaging from epoch 2 averages nothing
    with pytest.raises(ValueError, match="swa_start is 2 but the run is 2 epochs long"):
        _run(tmp_path, _batches(2, 2), max_steps=4, swa_start=2.0)
