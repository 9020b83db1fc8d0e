"""``layers.dropout``: the CPU dropout with an integer-drawn mask is dropout: each element zeroed with probability
p (checked against binomial bounds), the rest scaled by 1 / (1 - p), the gradient through the same mask, seeded by
``torch.manual_seed``, and the identity in eval."""

from __future__ import annotations

import math

import pytest
import torch

from bunmyaku.models.layers import Dropout, dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_rate_scale_and_gradient(p):
    torch.manual_seed(0)
    n = 200_000
    x = (torch.rand(n) + 0.5).requires_grad_()  # no zeros: a zero output means dropped
    y = dropout(x, p)
    dropped = y == 0
    # the number dropped is Binomial(n, p): within 6 standard deviations of n p
    assert abs(int(dropped.sum()) - n * p) < 6 * math.sqrt(n * p * (1 - p))
    kept = ~dropped
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)
    w = torch.randn(n)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, torch.where(kept, w / (1 - p), 0.0), rtol=1e-6, atol=0)


def test_seeded_and_fresh_each_call():
    x = torch.ones(4, 1000)
    torch.manual_seed(3)
    a = dropout(x, 0.3)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.3), a)
    assert not torch.equal(dropout(x, 0.3), a)  # the generator moved on


def test_identity_in_eval_and_at_zero_and_zeros_at_one():
    x = torch.randn(8, 16)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    module = Dropout(0.5).eval()
    assert module(x) is x
    assert not torch.equal(module.train()(x), x)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dropout(x, 1.5)
