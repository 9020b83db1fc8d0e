"""FGM, AWP and SAM / ASAM: three steps equal a plain-PyTorch loop written from the papers' equations, gradient
accumulation equals the full batch, an fp16 step skipped by the GradScaler perturbs nothing, bf16 trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bunmyaku.data import CausalLMCollator, PackedBlocks
from bunmyaku.training import Plugin, TrainArgs, Trainer
from bunmyaku.training.adversarial import AWP, FGM, SAM
from bunmyaku.training.recipe import build_args
from tests.training.helpers import EOS, Plan, random_split, tiny_gpt2

LR = 1e-2
EPS = 1e-3  # Adam epsilon: the key biases have a zero gradient up to rounding, which a tiny epsilon would amplify
SETTINGS = {
    "fgm": {"fgm": 0.5},
    "awp": {"awp_lr": 0.5, "awp_eps": 0.01},
    "sam": {"sam": 0.05},
    "asam": {"sam": 0.5, "sam_adaptive": True},
}


def _batches(n: int, size: int):
    blocks = PackedBlocks(random_split(), 16, EOS)
    collate = CausalLMCollator()
    return [collate([blocks[i] for i in range(j * size, (j + 1) * size)], epoch=0, indices=[]) for j in range(n)]


def _args(tmp_path, **kwargs) -> TrainArgs:
    defaults = dict(
        output_dir=str(tmp_path / "run"),
        progress=False,
        plot=False,
        resume=False,
        warmup_steps=0,
        schedule="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        lr=LR,
        adam_eps=EPS,
        max_steps=3,
        batch_size=1,
        eval_every=0,
        save_every=0,
        device="cpu",
    )
    return TrainArgs(**{**defaults, **kwargs})


def _train(tmp_path, batches, plugins=(), checkpoint=False, **kwargs):
    model = tiny_gpt2()
    args = _args(tmp_path, **kwargs)
    trainer = Trainer(model, args, Plan(batches), plugins=plugins, export_dir=None, checkpoint_at_end=checkpoint)
    trainer.fit()
    return trainer, model


# ------------------------------------------------------------------------------------------ the reference


def _loss(model, batch):
    logits = model(input_ids=batch["input_ids"]).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _reference(kind: str, batches, steps: int = 3):
    """Plain PyTorch: AdamW, one batch per step, the technique written from its paper."""
    model = tiny_gpt2()
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, eps=EPS, weight_decay=0.0)
    setting = SETTINGS[kind]
    for step in range(steps):
        batch = batches[step % len(batches)]
        opt.zero_grad()
        _loss(model, batch).backward()
        if kind == "fgm":  # r_adv = eps g / ||g|| on the embeddings; the adversarial loss's gradient is added
            emb = model.get_input_embeddings().weight
            original = emb.detach().clone()
            g = emb.grad.detach()
            with torch.no_grad():
                emb.add_(setting["fgm"] * g / torch.sqrt((g * g).sum()))
            _loss(model, batch).backward()
            with torch.no_grad():
                emb.copy_(original)
        elif kind == "awp":  # w + lr ||w|| g/||g||, clipped to w +- eps|w|, matrices only; gradients added
            originals = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, w in zip(params, originals, strict=True):
                    if p.ndim < 2:
                        continue
                    g = p.grad
                    moved = w + setting["awp_lr"] * torch.sqrt((w * w).sum()) * g / torch.sqrt((g * g).sum())
                    p.copy_(torch.clamp(moved, w - setting["awp_eps"] * w.abs(), w + setting["awp_eps"] * w.abs()))
            _loss(model, batch).backward()
            with torch.no_grad():
                for p, w in zip(params, originals, strict=True):
                    p.copy_(w)
        else:  # SAM: e = rho g/||g||; ASAM: e = rho T^2 g / ||T g||, T = |w|; step with the gradient at w + e
            originals = [p.detach().clone() for p in params]
            t = [w.abs() if kind == "asam" else torch.ones_like(w) for w in originals]
            norm = torch.sqrt(sum(((ti * p.grad) ** 2).sum() for ti, p in zip(t, params, strict=True)))
            with torch.no_grad():
                for p, ti in zip(params, t, strict=True):
                    p.add_(setting["sam"] * ti * ti * p.grad / norm)
            opt.zero_grad()
            _loss(model, batch).backward()
            with torch.no_grad():
                for p, w in zip(params, originals, strict=True):
                    p.copy_(w)
        opt.step()
    return model


def _assert_same_weights(a, b, atol=1e-6, rtol=1e-5):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_three_steps_equal_the_papers_equations(tmp_path, kind):
    batches = _batches(3, 2)
    _, model = _train(tmp_path, batches, **SETTINGS[kind])
    _assert_same_weights(model, _reference(kind, batches))
    _, plain = _train(tmp_path / "plain", batches)  # the technique changed the weights: not a no-op
    assert any(not torch.allclose(a, b, atol=1e-5) for a, b in zip(model.parameters(), plain.parameters(), strict=True))


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_accumulation_equals_the_full_batch(tmp_path, kind):
    micro = _batches(4, 1)
    full = {k: torch.cat([b[k] for b in micro]) for k in micro[0]}
    _, accumulated = _train(tmp_path / "a", micro, grad_accum_steps=4, **SETTINGS[kind])
    _, whole = _train(tmp_path / "b", [full], grad_accum_steps=1, **SETTINGS[kind])
    _assert_same_weights(accumulated, whole, atol=2e-6, rtol=1e-5)


class _Count(Plugin):
    """Counts forwards per step; injects an infinite gradient after the backward of the given steps."""

    def __init__(self, inf_steps=()):
        self.inf_steps, self.forwards = set(inf_steps), []

    def before_optimizer_step(self, trainer):  # runs before the adversarial plugin's (listed first)
        if trainer.step in self.inf_steps:
            trainer.unwrapped_model.get_input_embeddings().weight.grad[0, 0] = float("inf")

    def before_backward(self, trainer, loss):
        while len(self.forwards) <= trainer.step:
            self.forwards.append(0)
        self.forwards[trainer.step] += 1


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_fp16_step_skipped_by_the_scaler_is_not_perturbed(tmp_path, kind):
    # CPU GradScaler runs here (torch.amp.GradScaler("cpu")): a real fp16 autocast step with an injected inf
    batches = _batches(3, 2)
    count = _Count(inf_steps={1})
    before = {}

    class Snapshot(Plugin):
        def before_optimizer_step(self, trainer):
            if trainer.step == 1:
                before.update({n: p.detach().clone() for n, p in trainer.unwrapped_model.named_parameters()})

        def after_optimizer_step(self, trainer):
            if trainer.step == 1:
                after = dict(trainer.unwrapped_model.named_parameters())
                for name, value in before.items():
                    assert torch.equal(after[name].detach(), value), f"{name} changed on a skipped step"

    trainer, _ = _train(tmp_path, batches, plugins=[count, Snapshot()], precision="fp16", **SETTINGS[kind])
    assert trainer.scaler is not None and trainer.scaler.get_scale() < 65536.0, "the scaler saw the inf"
    assert count.forwards == [2, 1, 2], "one pass on the skipped step, two on the others"


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_fp16_perturbation_reads_the_unscaled_gradient(tmp_path, kind):
    """Under a scale of 2^16 the perturbation equals fp32's at the same point (a scaled gradient would be
    unit-free in the direction but overflow or mislead the finiteness check)."""
    batches = _batches(1, 2)
    moved = {}

    class Record(Plugin):
        def before_backward(self, trainer, loss):
            if trainer._passes == 1:
                moved[trainer.args.precision] = {
                    n: p.detach().clone() for n, p in trainer.unwrapped_model.named_parameters()
                }
            trainer._passes += 1

    for precision in ("fp32", "fp16"):
        model = tiny_gpt2()
        args = _args(tmp_path / precision, max_steps=1, precision=precision, **SETTINGS[kind])
        trainer = Trainer(model, args, Plan(batches), plugins=[Record()], export_dir=None)
        trainer._passes = 0
        trainer.fit()
    for name, value in moved["fp32"].items():
        torch.testing.assert_close(moved["fp16"][name], value, atol=2e-3, rtol=1e-2, msg=name)
    start = dict(tiny_gpt2().named_parameters())
    assert any(not torch.equal(start[n].detach(), v) for n, v in moved["fp16"].items()), "perturbed under fp16"


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_bf16_trains(tmp_path, kind):
    batches = _batches(3, 2)
    _, model = _train(tmp_path, batches, precision="bf16", **SETTINGS[kind])
    _, reference = _train(tmp_path / "fp32", batches, **SETTINGS[kind])
    start = tiny_gpt2()
    for (name, p), q, s in zip(model.named_parameters(), reference.parameters(), start.parameters(), strict=True):
        assert torch.isfinite(p).all(), name
        # bf16's step moves the weights as fp32's does, to bf16's precision
        torch.testing.assert_close(p - s, q - s, atol=5e-3, rtol=0.1, msg=name)


def test_awp_waits_for_its_start_epoch_and_resumes_exactly(tmp_path):
    batches = _batches(2, 2)  # 2 steps per epoch: AWP from step 3 (epoch 1)
    awp = {"awp_lr": 0.5, "awp_eps": 0.01, "awp_start_epoch": 1.0}
    first = _Count()
    _train(tmp_path / "whole", batches, plugins=[first], max_steps=4, **awp)
    assert first.forwards == [1, 1, 2, 2]
    _, whole = _train(tmp_path / "whole2", batches, max_steps=4, **awp)
    # interrupted after 3 steps (a checkpoint), then resumed to 4
    _train(tmp_path / "cut", batches, max_steps=3, checkpoint=True, **awp)
    _, resumed = _train(tmp_path / "cut", batches, max_steps=4, resume=True, **awp)
    _assert_same_weights(resumed, whole, atol=0, rtol=0)


def test_adversarial_flags_build_the_plugins_and_bad_values_are_refused(tmp_path):
    trainer = Trainer(tiny_gpt2(), _args(tmp_path, fgm=1.0, awp_lr=0.1, awp_start_epoch=2), Plan([]))
    kinds = {type(p): p for p in trainer.plugins}
    assert kinds[FGM].epsilon == 1.0 and kinds[AWP].lr == 0.1 and kinds[AWP].start_epoch == 2
    (args,) = build_args((TrainArgs,), {"sam": 0.5, "sam_adaptive": True})  # recipe keys
    (sam,) = Trainer(tiny_gpt2(), args, Plan([])).plugins
    assert isinstance(sam, SAM) and sam.rho == 0.5 and sam.adaptive
    bad = [("fgm", -1.0), ("sam", float("nan")), ("awp_eps", 0.0), ("awp_lr", "1e-3"), ("sam_adaptive", True)]
    for field, value in bad:
        with pytest.raises(ValueError, match=field):
            _args(tmp_path, **{field: value})
    with pytest.raises(ValueError, match="sam cannot be combined"):
        _args(tmp_path, sam=0.05, fgm=1.0)
    with pytest.raises(ValueError, match="frozen"):
        _train(tmp_path, _batches(1, 2), fgm=1.0, freeze_embeddings=True)
