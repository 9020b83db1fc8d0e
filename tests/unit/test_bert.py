"""BERT unit tests: shapes, padding invariance, eager == SDPA, gradient checkpointing, overfitting."""

from __future__ import annotations

import torch

from bunmyaku.models.bert import BertConfig, BertForMaskedLM, BertForMultipleChoice, BertForQuestionAnswering, BertModel

TINY = dict(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, max_seq_len=64)


def _model(cls=BertModel, **kw):
    torch.manual_seed(0)
    return cls.from_config(BertConfig(**{**TINY, **kw})).eval()


def test_shapes():
    ids = torch.randint(1, 99, (2, 7))
    out = _model()(input_ids=ids, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 7, 32) and out.pooler_output.shape == (2, 32)
    assert len(out.hidden_states) == 3
    assert _model(BertForMaskedLM)(input_ids=ids).logits.shape == (2, 7, 99)
    qa = _model(BertForQuestionAnswering)(input_ids=ids)
    assert qa.start_logits.shape == qa.end_logits.shape == (2, 7)
    assert _model(BertForMultipleChoice)(input_ids=torch.randint(1, 99, (2, 4, 7))).logits.shape == (2, 4)


def test_padding_invariance():
    model = _model()
    ids = torch.randint(1, 99, (1, 5))
    alone = model(input_ids=ids).last_hidden_state
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    batch = torch.cat([padded, torch.randint(1, 99, (1, 9))])
    mask = torch.tensor([[1] * 5 + [0] * 4, [1] * 9])
    out = model(input_ids=batch, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[0, :5], alone[0], atol=1e-5, rtol=1e-5)


def test_eager_reference_equals_sdpa():
    ids, mask = torch.randint(1, 99, (3, 8)), torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    a = _model()(input_ids=ids, attention_mask=mask).last_hidden_state
    b = _model(attn_implementation="eager")(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(1, 99, (2, 7))
    grads = []
    for checkpointing in (False, True):
        model = _model(BertForMaskedLM, dropout=0.0, attention_dropout=0.0).train()
        model.gradient_checkpointing_enable(checkpointing)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_overfits_one_batch():
    model = _model(BertForMaskedLM).train()
    ids = torch.randint(5, 99, (4, 8))
    labels = ids.clone()
    inputs = ids.clone()
    inputs[:, ::3] = 4  # "[MASK]"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = model(input_ids=inputs, labels=labels).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_roberta_masked_lm_builds_only_its_own_mlm_head(monkeypatch):
    """RoBERTa's MLM head replaces BERT's: BERT's is never built (and thrown away)."""
    from bunmyaku.models import bert
    from bunmyaku.models.roberta import RobertaConfig, RobertaForMaskedLM, RobertaMLMHead

    built = []
    original = bert.BertMLMHead.__init__

    def spy(self, *args, **kwargs):
        built.append(type(self))
        original(self, *args, **kwargs)

    monkeypatch.setattr(bert.BertMLMHead, "__init__", spy)
    model = RobertaForMaskedLM(RobertaConfig(**TINY))
    assert built == [RobertaMLMHead] and type(model.head.mlm) is RobertaMLMHead
    BertForMaskedLM(BertConfig(**TINY))
    assert built == [RobertaMLMHead, bert.BertMLMHead]


def test_every_bert_head_finds_its_token_embeddings():
    """What FGM perturbs and resize_token_embeddings grows: the (V, C) token table, the one the encoder reads."""
    from bunmyaku.models.bert import BertForSequenceClassification
    from bunmyaku.models.roberta import RobertaConfig, RobertaForMaskedLM

    classifier = _model(BertForSequenceClassification, id2label={0: "a", 1: "b", 2: "c"})
    for model in (_model(), classifier, _model(BertForMaskedLM)):
        table = model.get_input_embeddings()
        assert isinstance(table, torch.nn.Embedding) and table.weight.shape == (99, 32)
        ids = torch.tensor([[5, 6, 7]])
        with torch.no_grad():
            before = model(input_ids=ids)
            table.weight[6] += torch.randn(32)  # the encoder must read this very table (not a constant: LayerNorm)
            after = model(input_ids=ids)
        first = before.logits if before.logits is not None else before.last_hidden_state
        second = after.logits if after.logits is not None else after.last_hidden_state
        assert not torch.allclose(first, second)
    roberta = RobertaForMaskedLM.from_config(RobertaConfig(**TINY, pad_token_id=1))
    assert roberta.get_input_embeddings().weight.shape == (99, 32)
