"""The CPU path of ``bunmyaku.models.linear`` (oneDNN's inner product): taken for float32 on x86 outside autocast
and compiled graphs, and it computes what ``F.linear`` computes, outputs and gradients, to float32 rounding."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from bunmyaku.models import linear as linear_module
from bunmyaku.models.linear import Linear, linear

needs_onednn = pytest.mark.skipif(not linear_module.ONEDNN_AVAILABLE, reason="oneDNN linear exists on x86 CPUs only")


@pytest.fixture(autouse=True)
def onednn_on(monkeypatch):
    """The path under test, also where it is off by default (x86 without AVX-512, where GEMM measured faster)."""
    monkeypatch.setattr(linear_module, "CPU_ONEDNN", linear_module.ONEDNN_AVAILABLE)


@pytest.fixture
def onednn_calls(monkeypatch):
    calls = []
    op = linear_module._ONEDNN_OP
    monkeypatch.setattr(linear_module, "_ONEDNN_OP", lambda *a: calls.append(a[0].shape) or op(*a))
    return calls


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 48), (8, 48), (300, 48), (2, 7, 48), (0, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_inference_takes_onednn_and_equals_f_linear(shape, bias, onednn_calls):
    torch.manual_seed(0)
    layer = Linear(48, 96, bias=bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        y = layer(x)
    assert onednn_calls == [x.shape]
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_no_grad_and_frozen_weights_take_onednn(onednn_calls):
    layer = Linear(16, 8)
    with torch.no_grad():
        layer(torch.randn(3, 16))
    layer.requires_grad_(False)
    layer(torch.randn(3, 16))  # grad mode on, but nothing here needs a gradient
    assert len(onednn_calls) == 2


@needs_onednn
@pytest.mark.parametrize("shape", [(5, 24), (2, 7, 24)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("trainable", ["all", "input-only", "weights-only"])
def test_training_gradients_equal_f_linear(shape, bias, trainable, onednn_calls):
    """Forward on oneDNN, backward on GEMM: the output and the gradients of x, W and b equal F.linear's."""
    torch.manual_seed(0)
    layer = Linear(24, 40, bias=bias)
    layer.requires_grad_(trainable != "input-only")
    x = torch.randn(*shape, requires_grad=trainable != "weights-only")
    g = torch.randn(*shape[:-1], 40)
    leaves = [t for t in (x, layer.weight, layer.bias) if t is not None and t.requires_grad]
    ours = torch.autograd.grad(layer(x), leaves, g)
    assert len(onednn_calls) == 1  # the forward; the backward's products run on GEMM
    reference = torch.autograd.grad(F.linear(x, layer.weight, layer.bias), leaves, g)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_autocast_and_bf16_stay_on_f_linear(onednn_calls):
    torch.manual_seed(0)
    layer = Linear(16, 8)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16, "CPU autocast must still cast the linear"
    with torch.inference_mode():
        layer.to(torch.bfloat16)(x.bfloat16())
    assert onednn_calls == []


@needs_onednn
def test_transposed_weight_view(onednn_calls):
    """A tied or transposed weight may be a non-contiguous view: same numbers."""
    torch.manual_seed(0)
    weight = torch.randn(32, 64).t()  # (64, 32) view
    x = torch.randn(5, 32)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, weight), F.linear(x, weight), atol=1e-5, rtol=1e-5)
    assert len(onednn_calls) == 1


def test_switch_off_gives_f_linear(monkeypatch, onednn_calls):
    monkeypatch.setattr(linear_module, "CPU_ONEDNN", False)
    with torch.inference_mode():
        Linear(4, 4)(torch.randn(2, 4))
    assert onednn_calls == []


@needs_onednn
def test_greedy_generation_is_token_identical_with_and_without_onednn(monkeypatch):
    from bunmyaku.models.generation import generate
    from bunmyaku.models.gpt2 import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_config(GPT2Config(vocab_size=500, num_layers=2, num_heads=4, hidden_size=64)).eval()
    ids = torch.randint(0, 500, (3, 10))
    with torch.inference_mode():
        fast = generate(model, ids, max_new_tokens=20, cache="static")
        monkeypatch.setattr(linear_module, "CPU_ONEDNN", False)
        plain = generate(model, ids, max_new_tokens=20, cache="static")
    assert torch.equal(fast, plain)


@pytest.fixture
def reorders(monkeypatch):
    """Counts the weights packed for oneDNN."""
    calls = []
    op = linear_module._REORDER_OP
    monkeypatch.setattr(
        linear_module, "_REORDER_OP", lambda w, rows: calls.append((tuple(w.shape), rows)) or op(w, rows)
    )
    return calls


@needs_onednn
def test_packed_weights_are_packed_once_used_for_few_rows_and_freed(reorders):
    torch.manual_seed(0)
    layer = Linear(48, 96)
    with torch.inference_mode(), linear_module.packed_weights(8):
        for rows in (1, 8, 2):  # every call of at most 8 rows reads the one packed copy
            x = torch.randn(rows, 48)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        x = torch.randn(4, 9, 48)  # 36 rows: a prefill, on the plain weight
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        assert reorders == [((96, 48), 8)]
        assert linear_module._PACKS.get() is not None
    assert linear_module._PACKS.get() is None  # the copies go with the block


@needs_onednn
def test_a_weight_changed_in_place_is_packed_again(reorders):
    layer = Linear(16, 8, bias=False)
    x = torch.randn(2, 16)
    with linear_module.packed_weights(2):
        with torch.no_grad():
            layer(x)
            layer.weight.mul_(2.0)
            y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.weight), atol=1e-5, rtol=1e-5)
    assert len(reorders) == 2


@needs_onednn
def test_packing_stops_at_the_memory_budget(monkeypatch, reorders):
    monkeypatch.setattr(linear_module, "_available_memory", lambda: 2 * 16 * 8 * 4)  # room for one 16x8 weight
    first, second = Linear(16, 8, bias=False), Linear(16, 8, bias=False)
    x = torch.randn(2, 16)
    with torch.inference_mode(), linear_module.packed_weights(2):
        first(x)
        y = second(x)
    assert len(reorders) == 1
    torch.testing.assert_close(y, F.linear(x, second.weight), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_packing_switched_off(monkeypatch, reorders):
    monkeypatch.setattr(linear_module, "PACKED_DECODING", False)
    with torch.inference_mode(), linear_module.packed_weights(2):
        Linear(16, 8)(torch.randn(2, 16))
    assert reorders == []


@needs_onednn
def test_training_never_reads_packed_weights(reorders):
    layer = Linear(16, 8)
    x = torch.randn(2, 16, requires_grad=True)
    with linear_module.packed_weights(2):
        layer(x).sum().backward()
    assert reorders == [] and layer.weight.grad is not None


@needs_onednn
@pytest.mark.parametrize("beams", [1, 2])
def test_batched_generation_packs_weights_and_keeps_the_tokens(monkeypatch, reorders, beams):
    from bunmyaku.models import generation
    from bunmyaku.models.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96
    )
    model = LlamaForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 300, (2, 6))
    with torch.inference_mode():
        packed = generation.generate(model, ids, max_new_tokens=16, cache="static", num_beams=beams, eos_token_id=[])
        # each layer's fused q/k/v, output, gate, up and down projections, and the LM head, packed once
        assert len(reorders) == 2 * 5 + 1 and {rows for _, rows in reorders} == {2 * beams}
        monkeypatch.setattr(generation, "packed_weights", lambda rows: contextlib.nullcontext())
        plain = generation.generate(model, ids, max_new_tokens=16, cache="static", num_beams=beams, eos_token_id=[])
    assert len(reorders) == 2 * 5 + 1
    assert torch.equal(packed, plain)


@needs_onednn
@pytest.mark.parametrize("act", [F.gelu, F.relu])
def test_activation_inside_the_product_equals_the_two_steps(act, onednn_calls):
    torch.manual_seed(0)
    layer = Linear(48, 96)
    x = torch.randn(300, 48)
    with torch.inference_mode():
        y = linear_module.linear_act(x, layer.weight, layer.bias, act)
    assert onednn_calls == [x.shape]
    torch.testing.assert_close(y, act(F.linear(x, layer.weight, layer.bias)), atol=1e-5, rtol=1e-5)


def test_activation_in_training_or_without_a_post_op_is_applied_after():
    torch.manual_seed(0)
    layer = Linear(8, 16)
    x = torch.randn(4, 8, requires_grad=True)
    y = linear_module.linear_act(x, layer.weight, layer.bias, F.gelu)
    y.sum().backward()  # differentiable: the two-step path
    expected = F.gelu(F.linear(x, layer.weight, layer.bias))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        tanh = linear_module.linear_act(x.detach(), layer.weight, layer.bias, torch.tanh)
    torch.testing.assert_close(tanh, torch.tanh(F.linear(x, layer.weight, layer.bias)).detach(), atol=1e-5, rtol=1e-5)


def test_mlp_runs_a_hooked_projection_as_a_module():
    from bunmyaku.models.config import LayerConfig
    from bunmyaku.models.layers import MLP

    mlp = MLP(LayerConfig(hidden_size=8, num_heads=1, intermediate_size=16, hidden_act="gelu", pre_norm=True)).eval()
    seen = []
    mlp.fc_in.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.inference_mode():
        y = mlp(torch.randn(3, 8))
    assert seen == [(3, 16)] and y.shape == (3, 8)


@needs_onednn
@pytest.mark.parametrize("frozen", [False, True])
def test_frozen_weight_keeps_no_input_for_backward(frozen):
    """Only the weight's gradient reads the input: under a frozen weight the training path saves the weight alone,
    as F.linear's autograd does (the memory planner counts on it), and the input's gradient is still right."""
    x = torch.randn(8, 16, requires_grad=True)
    layer = Linear(16, 4)
    layer.weight.requires_grad_(not frozen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert any(t.data_ptr() == x.data_ptr() for t in saved) == (not frozen)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(8, 4) @ layer.weight.detach())
