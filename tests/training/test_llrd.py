"""Layer-wise learning-rate decay and re-initialisation of the top layers, checked by parameter name."""

from __future__ import annotations

import re

import pytest
import torch

from bunmyaku.training import TrainArgs, Trainer
from tests.training.helpers import CLS, MASK, PAD, SEP, VOCAB, tiny_bert, tiny_gpt2

LR, DECAY, LAYERS = 1e-2, 0.5, 2


def _args(tmp_path, **kwargs) -> TrainArgs:
    defaults = dict(
        output_dir=str(tmp_path / "run"), progress=False, plot=False, resume=False, warmup_steps=0, batch_size=1
    )
    return TrainArgs(**{**defaults, **kwargs})


def _expected_lr(name: str) -> float:
    # written out from the documented rule, not from the plugin: head = top layer = lr, one decay per layer down,
    # embeddings one step below layer 0
    if name.startswith("backbone.layers.0."):
        return LR * DECAY
    if name.startswith("backbone.layers.1."):
        return LR
    if name.startswith("backbone.embed."):
        return LR * DECAY * DECAY
    assert name.startswith(("head.", "backbone.norm.", "backbone.pooler.")), name
    return LR


def _batch(kind: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, VOCAB, (4, 12), generator=gen)
    if kind == "gpt2":
        return {"input_ids": ids, "labels": ids.clone()}
    ids[:, 0], ids[:, -1] = CLS, SEP
    labels = torch.full_like(ids, -100)
    labels[:, 3:6] = ids[:, 3:6]
    ids[:, 3:6] = MASK
    return {"input_ids": ids, "attention_mask": (ids != PAD).long(), "labels": labels}


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_llrd_groups_have_the_formula_lr_and_step_like_a_hand_built_adamw(tmp_path, kind):
    make = tiny_bert if kind == "bert" else tiny_gpt2
    model = make(seed=0)
    reference = make(seed=0)
    args = _args(tmp_path, lr=LR, llrd=DECAY, schedule="constant", max_grad_norm=0.0, weight_decay=0.01)
    trainer = Trainer(model, args, [0], collator=lambda *a, **k: None)
    trainer._setup()
    lr_of = {}
    for group in trainer.optimizer.param_groups:
        for param in group["params"]:
            lr_of[id(param)] = group["lr"]
    names = dict(model.named_parameters())
    assert {id(p) for p in names.values()} == lr_of.keys()  # every parameter in exactly one group
    for name, param in names.items():
        assert lr_of[id(param)] == pytest.approx(_expected_lr(name), rel=1e-12), name
    assert len({round(v, 12) for v in lr_of.values()}) == LAYERS + 1

    # one step against torch's AdamW over groups built here by name
    groups: dict[tuple[float, float], list] = {}
    for name, param in reference.named_parameters():
        groups.setdefault((_expected_lr(name), 0.01 if param.ndim >= 2 else 0.0), []).append(param)
    hand = torch.optim.AdamW([{"params": p, "lr": lr, "weight_decay": wd} for (lr, wd), p in groups.items()])
    batch = _batch(kind)
    trainer._train_step([batch])
    trainer._optimizer_step()
    reference.train()
    reference(**batch).loss.backward()
    hand.step()
    initial = make(seed=0).state_dict()
    for (name, param), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param, ref, rtol=1e-5, atol=1e-7, msg=name)
        if name.endswith("q_proj.weight"):
            assert not torch.equal(param, initial[name]), name  # the step really moved the layers


def test_llrd_checks_its_value():
    with pytest.raises(ValueError, match="llrd"):
        TrainArgs(llrd=1.5)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_reinit_changes_exactly_the_top_layers(tmp_path, kind):
    make = tiny_bert if kind == "bert" else tiny_gpt2
    model = make(seed=0)
    with torch.no_grad():  # trained-looking weights: norms away from 1 / 0, so a re-initialisation shows
        for param in model.parameters():
            param.add_(0.5 + 0.01 * torch.arange(param.numel()).reshape(param.shape) % 0.3)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    trainer = Trainer(model, _args(tmp_path, reinit_layers=1), [0], collator=lambda *a, **k: None)
    trainer._setup()
    after = model.state_dict()
    std = model.config.initializer_range
    for name, tensor in after.items():
        top = re.search(r"\blayers\.1\.", name) is not None
        assert torch.equal(tensor, before[name]) != top, name
        if top and name.endswith("norm.weight"):
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        elif top and name.endswith("bias"):
            assert torch.equal(tensor, torch.zeros_like(tensor)), name
        elif top and name.endswith("fc_in.weight"):  # normal(0, initializer_range)
            assert abs(tensor.std().item() - std) < 0.2 * std and abs(tensor.mean().item()) < 0.2 * std, name
    with pytest.raises(ValueError, match="only 2 layers"):
        Trainer(make(), _args(tmp_path, reinit_layers=3), [0], collator=lambda *a, **k: None)._setup()
