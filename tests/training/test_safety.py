"""Safe ground: checkpoints hold no pickle and never run code, damaged checkpoints are skipped, non-finite
settings and losses stop a run loudly, and nothing non-finite is saved, exported or resumed from."""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import random
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bunmyaku.data import CausalLMCollator, PackedBlocks
from bunmyaku.training import EMA, TrainArgs, Trainer
from bunmyaku.training import checkpoint as ckpt
from bunmyaku.training.args import PretrainArgs
from bunmyaku.training.objectives import CausalLM
from bunmyaku.training.trainer import TrainingDiverged
from tests.training.helpers import EOS, random_split, tiny_gpt2


def _args(out, **kwargs) -> TrainArgs:
    defaults = dict(
        output_dir=str(out),
        progress=False,
        plot=False,
        batch_size=4,
        lr=3e-3,
        warmup_steps=0,
        schedule="constant",  # the rate at a step does not depend on max_steps: runs of different length agree
        eval_every=0,
        save_every=1,
        keep_last=5,
        log_every=1,
        device="cpu",
    )
    return TrainArgs(**{**defaults, **kwargs})


def _train():
    return PackedBlocks(random_split(), 16, EOS, random_offset=True)


def _fit(out, plugins=(), objective=None, **kwargs) -> Trainer:
    trainer = Trainer(tiny_gpt2(), _args(out, **kwargs), _train(), None, CausalLMCollator(), objective, plugins)
    trainer.fit()
    return trainer


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------------------------------------- state files


def test_trainer_state_round_trips_exactly_without_pickle(tmp_path):
    ema = EMA(0.9)
    args = _args(tmp_path / "run", max_steps=3, precision="fp16", save_every=0)
    trainer = Trainer(tiny_gpt2(), args, _train(), None, CausalLMCollator(), plugins=[ema])
    trainer.fit()
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    state = {
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "plugins": [ema.state_dict()],
        "rng": [ckpt.rng_state()],
        "best": {"eval_loss": math.inf, "step": None},
    }
    ckpt.write_state(tmp_path, state)
    # the JSON is strict JSON (no bare NaN / Infinity) and the tensors are plain safetensors
    strict = json.loads((tmp_path / ckpt.STATE_JSON).read_text(), parse_constant=lambda c: pytest.fail(c))
    assert strict["format"] == 1 and load_file(tmp_path / ckpt.STATE_TENSORS)
    back = ckpt.read_state(tmp_path)

    expected_opt, got_opt = state["optimizer"], back["optimizer"]
    assert got_opt["param_groups"] == expected_opt["param_groups"]  # lr, betas (a tuple), params, flags
    assert isinstance(got_opt["param_groups"][0]["betas"], tuple)
    assert got_opt["state"].keys() == expected_opt["state"].keys() and all(isinstance(k, int) for k in got_opt["state"])
    for index, entry in expected_opt["state"].items():
        assert entry.keys() == got_opt["state"][index].keys()
        for key, tensor in entry.items():
            assert got_opt["state"][index][key].dtype == tensor.dtype
            assert torch.equal(got_opt["state"][index][key], tensor), (index, key)
    assert back["scheduler"] == state["scheduler"]
    assert back["scaler"] == state["scaler"]
    assert back["best"]["eval_loss"] == math.inf
    shadow = state["plugins"][0]["shadow"]
    _assert_same({k: v for k, v in back["plugins"][0]["shadow"].items()}, shadow)

    # the generators continue exactly where the saved states left them
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ckpt.set_rng_state(back["rng"][0])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected_draws[0] and got[1] == expected_draws[1] and torch.equal(got[2], expected_draws[2])

    # a restored optimizer steps exactly like the original
    fresh = Trainer(tiny_gpt2(), args, _train(), None, CausalLMCollator())
    fresh._setup()
    fresh.optimizer.load_state_dict(back["optimizer"])
    assert fresh.optimizer.state_dict()["param_groups"] == expected_opt["param_groups"]


def test_nothing_in_a_checkpoint_is_a_pickle(tmp_path):
    _fit(tmp_path / "run", max_steps=1)
    folder = ckpt.step_dir(tmp_path / "run" / "checkpoints", 1)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "model.safetensors",
        ckpt.STATE_JSON,
        ckpt.STATE_TENSORS,
    ]
    for path in folder.iterdir():
        with pytest.raises(Exception):  # noqa: B017  (whatever unpickling raises: none of them is a pickle)
            pickle.loads(path.read_bytes())


def test_planted_pickles_never_run_on_resume(tmp_path, caplog):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload)  # the payload is live: unpickling it runs the command
    assert marker.exists()
    marker.unlink()

    out = tmp_path / "run"
    _fit(out, max_steps=2)
    latest = ckpt.step_dir(out / "checkpoints", 2)
    for name in (ckpt.STATE_JSON, ckpt.STATE_TENSORS, ckpt.LEGACY_STATE):
        (latest / name).write_bytes(payload)
    with caplog.at_level("WARNING"):
        trainer = _fit(out, max_steps=3)
    assert not marker.exists()
    assert "step-00000002" in caplog.text and "damaged" in caplog.text
    assert trainer.step == 3

    # a folder in the old format: refused with a message naming it, never unpickled
    old = ckpt.step_dir(out / "checkpoints", 7)
    old.mkdir()
    (old / ckpt.LEGACY_STATE).write_bytes(payload)
    with pytest.raises(ckpt.LegacyCheckpointError, match="trainer_state.pt"):
        _fit(out, max_steps=9)
    assert not marker.exists()


def test_plain_modules_are_saved_as_safetensors(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(9, 4), torch.nn.Linear(4, 9))
    model[1].weight = model[0].weight  # tied, stored once
    ckpt.save_model(model, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    other = torch.nn.Sequential(torch.nn.Embedding(9, 4), torch.nn.Linear(4, 9))
    other[1].weight = other[0].weight
    ckpt.load_model(other, tmp_path)
    _assert_same(other.state_dict(), model.state_dict())


# ---------------------------------------------------------------------------------------------- damaged checkpoints


def _cut(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _poison_weights(folder):
    weights = _weights(folder)
    name = next(iter(weights))
    weights[name][0] = math.nan
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: _cut(f / "model.safetensors"),
        lambda f: (f / ckpt.STATE_JSON).unlink(),
        lambda f: _cut(f / ckpt.STATE_TENSORS),
        lambda f: _cut(f / ckpt.STATE_JSON),
        _poison_weights,
    ],
    ids=["weights-cut", "state-missing", "state-tensors-cut", "state-json-cut", "nan-weights"],
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog, damage):
    reference = _fit(tmp_path / "reference", max_steps=4)
    assert reference.step == 4
    out = tmp_path / "damaged"
    _fit(out, max_steps=3)
    damage(ckpt.step_dir(out / "checkpoints", 3))
    with caplog.at_level("INFO"):
        _fit(out, max_steps=4)
    assert "step-00000003" in caplog.text
    assert "Resumed from" in caplog.text and "step-00000002" in caplog.text
    _assert_same(_weights(out), _weights(tmp_path / "reference"))  # steps 3 and 4 redone exactly


# ---------------------------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr", math.inf),
        ("lr", math.nan),
        ("lr", -1e-3),
        ("lr", 0.0),
        ("max_steps", 0),
        ("max_steps", math.nan),
        ("max_steps", 2.5),
        ("warmup_steps", -1),
        ("weight_decay", math.nan),
        ("weight_decay", -0.1),
        ("max_grad_norm", math.inf),
        ("max_grad_norm", -1.0),
        ("batch_size", 0),
        ("grad_accum_steps", -2),
        ("adam_beta2", 1.0),
        ("adam_eps", 0.0),
        ("min_lr_ratio", 1.5),
        ("ema_decay", math.nan),
        ("keep_last", 0),
        ("lr", "1e-3"),
    ],
)
def test_bad_numbers_are_refused_naming_the_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must .*{re.escape(repr(value)[:4])}"):
        TrainArgs(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [("valid_fraction", math.nan), ("valid_fraction", 1.0), ("mlm_probability", 0.0), ("block_size", 4)],
)
def test_bad_pretraining_numbers_are_refused(field, value):
    with pytest.raises(ValueError, match=f"^{field} must"):
        PretrainArgs(model_config="m.json", data=["x.txt"], **{field: value})


class _PoisonedAt(CausalLM):
    """The causal-LM loss, made NaN on one training step (a bad batch, an overflow)."""

    def __init__(self, step: int):
        super().__init__()
        self.step, self.trainer = step, None

    def __call__(self, model, batch):
        losses, metrics = super().__call__(model, batch)
        if model.training and self.trainer.step + 1 == self.step:
            losses = {k: v * math.nan for k, v in losses.items()}
        return losses, metrics


@pytest.mark.parametrize("log_every", [1, 10])
def test_a_non_finite_loss_stops_the_run_naming_the_step_and_saves_nothing_after_it(tmp_path, log_every):
    out = tmp_path / "run"
    objective = _PoisonedAt(3)
    trainer = Trainer(
        tiny_gpt2(), _args(out, max_steps=6, log_every=log_every), _train(), None, CausalLMCollator(), objective
    )
    objective.trainer = trainer
    with pytest.raises(TrainingDiverged, match=r"loss became non-finite .*at step 3"):
        trainer.fit()
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [1, 2]
    assert not (out / "model.safetensors").exists()
    logged = (out / "metrics.jsonl").read_text().splitlines() if log_every == 1 else []
    assert len(logged) == (2 if log_every == 1 else 0)  # steps 1 and 2 were logged, step 3 was not
    for line in logged:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
    assert all(torch.isfinite(t).all() for t in _weights(ckpt.step_dir(out / "checkpoints", 2)).values())


def test_non_finite_weights_are_never_checkpointed_or_exported(tmp_path):
    from bunmyaku.training import Plugin

    class Overflow(Plugin):
        """An unused position embedding row becomes infinite: the loss stays finite, the weights do not."""

        def after_optimizer_step(self, trainer):
            if trainer.step == 1:
                with torch.no_grad():
                    trainer.unwrapped_model.backbone.embed.positions.weight[-1] = math.inf

    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="weights are not finite at step 2.*positions"):
        _fit(out, plugins=[Overflow()], max_steps=4)
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [1]

    ema = EMA(0.5)

    class OverflowAverage(Plugin):
        """The EMA weights (the ones exported) become infinite while the live weights stay finite."""

        def after_optimizer_step(self, trainer):
            if trainer.step == 1:
                ema.shadow["backbone.embed.positions.weight"][-1] = math.inf

    out = tmp_path / "export"
    with pytest.raises(TrainingDiverged, match="no export was written"):
        _fit(out, plugins=[ema, OverflowAverage()], max_steps=2)
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [1, 2]
    assert not (out / "model.safetensors").exists()


def test_fp16_steps_skipped_by_the_grad_scaler_are_not_divergence(tmp_path, monkeypatch):
    # a huge initial scale overflows the fp16 gradients: the scaler skips those steps and backs off
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**60))
    out = tmp_path / "run"
    trainer = _fit(out, max_steps=3, precision="fp16")
    assert trainer.scaler.get_scale() < 2.0**60
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=pytest.fail) for line in lines]
    assert records[0]["grad_norm"] is None and all(math.isfinite(r["loss"]) for r in records)
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize(("field", "value"), [("epochs", math.nan), ("epochs", math.inf), ("epochs", 0.0)])
def test_bad_epochs_are_refused_naming_the_field(field, value):
    from bunmyaku.tasks.finetune import FinetuneArgs

    with pytest.raises(ValueError, match=rf"^{field} must .*got {value}"):
        FinetuneArgs(**{field: value})
