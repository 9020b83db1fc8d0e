"""Unpadded (packed) encoder batches: the same outputs and gradients as the padded path (``unpad=False``).

Every test runs twice: attention re-padding the packed batch as a whole, and group by group (``RowGroup``, the CPU
path for rows of widely different lengths; the tiny batches here only form groups with the short-row rule off).
"""

from __future__ import annotations

import pytest
import torch

from bunmyaku.models import attention
from bunmyaku.models.attention import Packing
from bunmyaku.models.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel
from bunmyaku.models.roberta import RobertaConfig, RobertaForSequenceClassification, RobertaModel

TINY = dict(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, max_seq_len=64)
FAMILIES = {"bert": (BertConfig, BertModel), "roberta": (RobertaConfig, RobertaModel)}


@pytest.fixture(autouse=True, params=["whole-batch", "row-groups"])
def attention_rows(request, monkeypatch):
    if request.param == "row-groups":
        monkeypatch.setattr(attention, "GROUP_MIN_LENGTH", 0)
    else:
        monkeypatch.setattr(attention, "GROUP_RATIO", 0.0)  # every row joins the first group: no groups
    return request.param


def test_row_groups_split_rows_by_length(attention_rows):
    mask = (torch.arange(13)[None] < torch.tensor([13, 2, 9, 13, 4, 10, 1])[:, None]).long()
    packing = Packing.from_mask(mask)
    if attention_rows == "whole-batch":
        assert packing.groups is None
        return
    lengths = mask.sum(-1)
    rows = [g.rows.tolist() for g in packing.groups]
    assert sorted(r for group in rows for r in group) == list(range(7))  # every row once
    for group in packing.groups:
        longest = int(lengths[group.rows].max())
        assert group.length == longest and (lengths[group.rows] >= 0.75 * longest).all()
        assert (group.mask is None) == bool((lengths[group.rows] == longest).all())
    assert rows == [[0, 3, 5], [2], [4], [1], [6]]  # longest first; 10 >= 0.75 * 13 joins the full rows, 9 does not
    # the groups' tokens cover every packed token once, so writing each group's output to them fills the batch
    order = torch.cat([g.tokens for g in packing.groups])
    assert torch.equal(order.sort().values, torch.arange(int(lengths.sum())))
    assert Packing.from_mask(torch.ones(3, 5, dtype=torch.long)).groups is None  # one length: one group
    empty_row = mask.clone()
    empty_row[1] = 0
    assert Packing.from_mask(empty_row).groups is None  # a row without keys: the whole-batch path


def _batch(pad_id: int, seed: int, left: bool = False):
    """(6, 13) random ids, random lengths 1..13 (one full row), padded with ``pad_id`` on the right (or left)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 14, (6,), generator=gen)
    lengths[0] = 13
    mask = (torch.arange(13)[None] < lengths[:, None]).long()
    if left:
        mask = mask.flip(-1)
    ids = torch.randint(3, 99, (6, 13), generator=gen)
    types = (torch.arange(13)[None] >= lengths[:, None] // 2).long()  # a second segment in every row
    return ids.masked_fill(mask == 0, pad_id), mask, types


def _pair(config_cls, model_cls, **kw):
    """The same weights with and without unpadding, dropout off so that training mode is deterministic."""
    torch.manual_seed(0)
    config = config_cls(**TINY, dropout=0.0, attention_dropout=0.0, **kw)
    packed = model_cls.from_config(config)
    padded = model_cls(config_cls(**TINY, dropout=0.0, attention_dropout=0.0, unpad=False, **kw))
    padded.load_state_dict(packed.state_dict())
    return packed, padded


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outputs_equal_padded_path(family, seed):
    config_cls, model_cls = FAMILIES[family]
    packed, padded = (m.eval() for m in _pair(config_cls, model_cls, type_vocab_size=2))
    ids, mask, types = _batch(packed.config.pad_token_id, seed, left=seed == 2)
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    ours, ref = packed(**inputs), padded(**inputs)
    real = mask.bool()
    for a, b in zip(ours.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.last_hidden_state[real], ref.last_hidden_state[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.pooler_output, ref.pooler_output, atol=1e-5, rtol=1e-5)
    if seed == 2:  # left padding: position 0, which the pooler reads, is padding, so the batch runs padded
        torch.testing.assert_close(ours.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    else:
        assert not ours.last_hidden_state[~real].any(), "padding positions are zeros on the unpadded path"


@pytest.mark.parametrize(
    "config_cls, head_cls",
    [(BertConfig, BertForSequenceClassification), (RobertaConfig, RobertaForSequenceClassification)],
)
def test_gradients_equal_padded_path(config_cls, head_cls):
    packed, padded = (m.train() for m in _pair(config_cls, head_cls))
    ids, mask, _ = _batch(packed.config.pad_token_id, seed=3)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    grads = []
    for model in (packed, padded):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-5, msg=name)


def test_masked_lm_with_gradient_checkpointing_and_inputs_embeds():
    packed, padded = (m.train() for m in _pair(BertConfig, BertForMaskedLM))
    for model in (packed, padded):
        model.gradient_checkpointing_enable()
    ids, mask, _ = _batch(0, seed=4)
    labels = ids.masked_fill(mask == 0, -100)
    losses, grads = [], []
    for model in (packed, padded):
        embeds = model.backbone.embed.tokens(ids)
        loss = model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


def test_unpad_is_not_written_to_config_json():
    config = BertConfig(**TINY, unpad=False)
    assert "unpad" not in config.to_hf() and "attn_implementation" not in config.to_hf()


def test_a_loss_on_padding_positions_runs_padded():
    """Labels that score padding positions (not -100 there) need those positions' real outputs, as HF gives them."""
    packed, padded = (m.eval() for m in _pair(BertConfig, BertForMaskedLM))
    ids, mask, _ = _batch(0, seed=5)
    labels = ids.clone()  # every position scored, padding included
    with torch.no_grad():
        torch.testing.assert_close(
            packed(input_ids=ids, attention_mask=mask, labels=labels).loss,
            padded(input_ids=ids, attention_mask=mask, labels=labels).loss,
        )


@pytest.mark.parametrize("unpad", [True, False])
@pytest.mark.parametrize(
    "config_cls, head_cls",
    [(BertConfig, BertForSequenceClassification), (RobertaConfig, RobertaForSequenceClassification)],
)
def test_first_token_only_head_equals_the_full_encoder(config_cls, head_cls, unpad):
    """Sequence heads read [CLS] only, so their last layer skips the other positions: same loss, same gradients."""
    model = _pair(config_cls, head_cls)[0 if unpad else 1].train()
    ids, mask, _ = _batch(model.config.pad_token_id, seed=6)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # first_token_only inside
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    full = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state  # every position, (B, T, C)
    head = model.head.classifier
    logits = head(full) if head_cls is RobertaForSequenceClassification else head(model.backbone.pooler(full))
    reference = torch.nn.functional.cross_entropy(logits, labels)
    reference_grads = torch.autograd.grad(reference, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads, reference_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_varlen_dropout_function_hands_the_forward_rng_state_to_backward(monkeypatch):
    """The training varlen path's autograd wiring, on CPU with stand-ins for the flash kernels (the real kernels are
    tested in test_cuda.py): backward receives the Philox state forward returned, and q, k, v gradients in order."""
    from bunmyaku.models import attention

    def rows(q, k, v, cu, p, seed):
        gen = torch.Generator().manual_seed(int(seed))
        outs = []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            w = torch.einsum("thd,shd->hts", q[a:b], k[a:b]).div(q.size(-1) ** 0.5).softmax(-1)
            keep = (torch.rand(w.shape, generator=gen) >= p).to(w.dtype) / (1 - p)
            outs.append(torch.einsum("hts,shd->thd", w * keep, v[a:b]))
        return torch.cat(outs)

    seeds = iter([11, 12, 13])

    def fake_forward(q, k, v, cu_q, cu_k, max_q, max_k, p, causal, debug, scale=None):
        seed = next(seeds)
        return rows(q, k, v, cu_q, p, seed), torch.empty(0), torch.tensor([seed]), torch.empty(0), torch.empty(0)

    def fake_backward(grad, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, p, causal, rng, unused, scale=None):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():
            return torch.autograd.grad(rows(*leaves, cu_q, p, rng.item()), leaves, grad)

    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", fake_forward)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_backward", fake_backward)
    torch.manual_seed(0)
    cu = torch.tensor([0, 3, 10, 12], dtype=torch.int32)
    q, k, v = (torch.randn(12, 2, 4, requires_grad=True) for _ in range(3))
    g = torch.randn(12, 2, 4)
    attention.varlen_dropout_attention(q, k, v, cu, 7, 0.4).backward(g)
    ours = [t.grad.clone() for t in (q, k, v)]
    reference = torch.autograd.grad(rows(q, k, v, cu, 0.4, 11), (q, k, v), g)  # the first seed: forward's own mask
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b)
    wrong = torch.autograd.grad(rows(q, k, v, cu, 0.4, 12), (q, k, v), g)
    assert not torch.allclose(ours[2], wrong[2]), "a different mask must give different gradients"
