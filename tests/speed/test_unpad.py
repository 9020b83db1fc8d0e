"""Unpadded (packed) encoder batches: the same outputs and gradients as the padded path (``unpad=False``).

Every test runs twice: attention re-padding the packed batch as a whole, and group by group (``RowGroup``, the CPU
path for rows of widely different lengths; the tiny batches here only form groups with the short-row rule off).
"""

from __future__ import annotations

import pytest
import torch

from bunmyaku.models import fastpath
from bunmyaku.models.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel
from bunmyaku.models.fastpath import Packing
from bunmyaku.models.roberta import RobertaConfig, RobertaForSequenceClassification, RobertaModel

TINY = dict(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, max_seq_len=64)
FAMILIES = {"bert": (BertConfig, BertModel), "roberta": (RobertaConfig, RobertaModel)}


@pytest.fixture(autouse=True, params=["whole-batch", "row-groups"])
def attention_rows(request, monkeypatch):
    if request.param == "row-groups":
        monkeypatch.setattr(fastpath, "GROUP_MIN_LENGTH", 0)
    else:
        monkeypatch.setattr(fastpath, "GROUP_RATIO", 0.0)  # every row joins the first group: no groups
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


def _attention(num_kv_heads=4, implementation="sdpa", scale=None):
    from bunmyaku.models.attention import Attention
    from bunmyaku.models.config import LayerConfig

    config = LayerConfig(
        hidden_size=32, num_heads=4, intermediate_size=37, hidden_act="gelu", pre_norm=False,
        num_kv_heads=num_kv_heads, attention_scale=scale, attn_implementation=implementation,
    )  # fmt: skip
    return Attention(config)


ALL_VARLEN_KWARGS = frozenset({"scale", "enable_gqa"})


@pytest.mark.parametrize(
    "device, dtype, attn_kw, one_query, dropout_p, varlen_kwargs, expected",
    [
        ("cuda", torch.bfloat16, {}, False, 0.0, ALL_VARLEN_KWARGS, "varlen"),
        ("cuda", torch.float16, {}, False, 0.0, ALL_VARLEN_KWARGS, "varlen"),
        ("cuda", torch.bfloat16, {}, False, 0.1, ALL_VARLEN_KWARGS, "varlen-dropout"),  # training
        ("cuda", torch.bfloat16, {"num_kv_heads": 2}, False, 0.0, ALL_VARLEN_KWARGS, "varlen"),
        ("cuda", torch.bfloat16, {"num_kv_heads": 2}, False, 0.1, ALL_VARLEN_KWARGS, None),  # aten op: no GQA
        ("cuda", torch.bfloat16, {"num_kv_heads": 2}, False, 0.0, frozenset({"scale"}), None),  # no enable_gqa
        ("cuda", torch.bfloat16, {"scale": 0.5}, False, 0.0, frozenset(), None),  # this torch takes no scale
        ("cuda", torch.bfloat16, {"scale": 8**-0.5}, False, 0.0, frozenset(), "varlen"),  # the default scale anyway
        ("cuda", torch.bfloat16, {"scale": 0.5}, False, 0.0, ALL_VARLEN_KWARGS, "varlen"),
        ("cuda", torch.float32, {}, False, 0.0, ALL_VARLEN_KWARGS, None),  # flash needs fp16 / bf16
        ("cuda", torch.bfloat16, {"implementation": "eager"}, False, 0.0, ALL_VARLEN_KWARGS, None),  # the reference
        ("cuda", torch.bfloat16, {}, True, 0.0, ALL_VARLEN_KWARGS, None),  # one query per row ([CLS] only)
        ("cpu", torch.bfloat16, {}, False, 0.0, ALL_VARLEN_KWARGS, None),
        ("cpu", torch.float32, {}, False, 0.0, ALL_VARLEN_KWARGS, None),
    ],
)
def test_packed_route_is_chosen_by_device_dtype_and_layer(
    monkeypatch, attention_rows, device, dtype, attn_kw, one_query, dropout_p, varlen_kwargs, expected
):
    """Which way attention over packed rows runs, for which inputs (the kernels themselves: test_cuda.py).

    ``varlen_attn`` is made present, with the keyword set of a given torch release; nothing is called."""
    monkeypatch.setattr(fastpath, "varlen_attn", object())
    monkeypatch.setattr(fastpath, "_VARLEN_KWARGS", varlen_kwargs)
    mask = (torch.arange(40)[None] < torch.tensor([40, 3, 30, 12])[:, None]).long()
    packing = Packing.from_mask(mask)
    repad = "row-groups" if attention_rows == "row-groups" else "whole-batch"
    assert (packing.groups is not None) == (attention_rows == "row-groups")
    route = fastpath.packed_route(_attention(**attn_kw), packing, torch.device(device), dtype, one_query, dropout_p)
    assert route == (expected or repad)


def test_without_varlen_kernel_cuda_batches_re_pad(monkeypatch, attention_rows):
    monkeypatch.setattr(fastpath, "varlen_attn", None)
    packing = Packing.from_mask((torch.arange(40)[None] < torch.tensor([40, 3, 30, 12])[:, None]).long())
    route = fastpath.packed_route(_attention(), packing, torch.device("cuda"), torch.bfloat16, False, 0.0)
    assert route == ("row-groups" if attention_rows == "row-groups" else "whole-batch")


def test_the_chosen_route_is_the_one_taken(monkeypatch, attention_rows):
    """A BERT forward on a ragged CPU batch attends group by group exactly when the batch has row groups, in every
    layer (the last one too, with its one query per row), and the outputs equal the padded path's."""
    calls = []
    original = fastpath._attend_groups
    monkeypatch.setattr(fastpath, "_attend_groups", lambda *a, **k: calls.append(a[5]) or original(*a, **k))
    packed, padded = (m.eval() for m in _pair(BertConfig, BertForSequenceClassification))
    ids, mask, _ = _batch(0, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(
            packed(input_ids=ids, attention_mask=mask).logits, padded(input_ids=ids, attention_mask=mask).logits
        )
    expected = [False] * (TINY["num_layers"] - 1) + [True] if attention_rows == "row-groups" else []
    assert calls == expected
