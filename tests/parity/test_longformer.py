"""Longformer parity with ``transformers``: every head, per-layer windows, padded batches, global tokens, both ways."""

from __future__ import annotations

import pytest
import torch

import bunmyaku
from bunmyaku.models import sparse_attention
from tests.conftest import require_module
from tests.parity.helpers import assert_close, randomize, save

transformers = require_module("transformers")

PAD, BOS, SEP = 1, 0, 2
CONFIGS = [
    dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
    dict(
        vocab_size=101,
        hidden_size=36,
        num_hidden_layers=3,
        num_attention_heads=3,
        intermediate_size=50,
        hidden_act="gelu_new",
        type_vocab_size=1,
        layer_norm_eps=1e-5,
    ),
]
WINDOWS = [[4, 16], [8, 6, 12]]  # two-sided, per layer; lengths below are no multiple of the largest
LENGTHS = [37, 61]

# task -> (HF class suffix, output fields to compare, extra config)
HEADS = {
    "base": ("Model", ["last_hidden_state", "pooler_output"], {}),
    "masked-lm": ("ForMaskedLM", ["logits"], {}),
    "sequence-classification": ("ForSequenceClassification", ["logits"], {"num_labels": 3}),
    "token-classification": ("ForTokenClassification", ["logits"], {"num_labels": 5}),
    "question-answering": ("ForQuestionAnswering", ["start_logits", "end_logits"], {}),
}


def _hf_config(index: int, **extra):
    return transformers.LongformerConfig(
        **CONFIGS[index],
        attention_window=WINDOWS[index],
        max_position_embeddings=LENGTHS[index] + 2,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=SEP,
        sep_token_id=SEP,
        **extra,
    )


def _batch(index: int, seed: int):
    """Right-padded rows shaped ``<s> question </s></s> context </s> <pad>...``, three separators in each."""
    T, vocab = LENGTHS[index], CONFIGS[index]["vocab_size"]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, T), generator=gen)
    mask = torch.ones(3, T, dtype=torch.long)
    for row, (length, question) in enumerate([(T, 5), (T - 11, 3), (9, 2)]):
        ids[row, 0] = BOS
        ids[row, question + 1 : question + 3] = SEP
        ids[row, length - 1] = SEP
        ids[row, length:] = PAD
        mask[row, length:] = 0
    return ids, mask


def _compare(ours, theirs, fields):
    for field in fields:
        assert_close(ours[field], getattr(theirs, field))  # padding positions included: HF computes them too


@pytest.mark.parametrize("task", list(HEADS))
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_longformer_parity_both_directions(tmp_path, monkeypatch, task, index):
    if index == 1:  # several query blocks per row on the CPU path (by default one block covers these lengths)
        monkeypatch.setattr(sparse_attention, "MIN_BLOCK", 4)
    suffix, fields, extra = HEADS[task]
    hf_class = getattr(transformers, "Longformer" + suffix)
    hf_model = randomize(hf_class(_hf_config(index, **extra)), seed=index)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))  # the head from `architectures`
    assert type(model).task == task and type(model).__name__ == "Longformer" + suffix
    ids, mask = _batch(index, seed=index)
    global_mask = torch.zeros_like(ids)
    global_mask[:, 0] = 1
    global_mask[0, [7, LENGTHS[index] - 1]] = 1  # uneven global counts; the last token of a full row
    global_mask[2, 20] = 1  # global attention asked on padding: never global
    cases = [dict(input_ids=ids, attention_mask=mask, global_attention_mask=global_mask)]
    cases.append(dict(input_ids=ids, attention_mask=mask))  # the head's default global tokens (none, <s>, question)
    many_global = torch.zeros_like(ids)
    many_global[:, :14] = 1  # G = 14 >= D: global keys and values projected for every token, not through the inputs
    cases.append(dict(input_ids=ids, attention_mask=mask, global_attention_mask=many_global))
    with torch.no_grad():
        reloaded = hf_class.from_pretrained(save(model, tmp_path / "ours")).eval()  # bunmyaku saves, HF loads
        for inputs in cases:
            expected = hf_model(**inputs)
            _compare(model(**inputs), expected, fields)
            _compare({f: getattr(reloaded(**inputs), f) for f in fields}, expected, fields)


def test_longformer_losses_and_gradients_match(tmp_path):
    ids, mask = _batch(0, seed=5)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.7, -100)
    tags = torch.randint(0, 5, ids.shape).masked_fill(mask == 0, -100)
    some_global = torch.zeros_like(ids)
    some_global[:, [0, 3]] = 1
    cases = [  # the default global tokens of sequence classification (<s>) and QA (the question); given ones else
        ("ForMaskedLM", {}, {"labels": labels, "global_attention_mask": some_global}),
        ("ForSequenceClassification", {"num_labels": 3}, {"labels": torch.tensor([0, 2, 1])}),
        ("ForTokenClassification", {"num_labels": 5}, {"labels": tags, "global_attention_mask": some_global}),
        (
            "ForQuestionAnswering",
            {},
            {"start_positions": torch.tensor([1, 30, 50]), "end_positions": torch.tensor([2, 33, 50])},
        ),
    ]
    for suffix, extra, label_kw in cases:
        hf_model = randomize(getattr(transformers, "Longformer" + suffix)(_hf_config(0, **extra)), seed=3)
        model = bunmyaku.from_pretrained(save(hf_model, tmp_path / suffix))
        expected = hf_model(input_ids=ids, attention_mask=mask, **label_kw)
        out = model(input_ids=ids, attention_mask=mask, **label_kw)
        assert_close(out.loss, expected.loss)
        expected.loss.backward()
        out.loss.backward()
        ours = dict(model.named_parameters())
        theirs = dict(hf_model.named_parameters())
        for layer in range(2):  # the local and the global projections of every layer
            for hf_name, our_name in [("query", "q_proj"), ("value_global", "v_global"), ("query_global", "q_global")]:
                assert_close(
                    ours[f"backbone.layers.{layer}.attn.{our_name}.weight"].grad,
                    theirs[f"longformer.encoder.layer.{layer}.attention.self.{hf_name}.weight"].grad,
                )


def test_config_round_trip_and_bad_windows():
    from bunmyaku.models.longformer import LongformerConfig

    config = LongformerConfig.from_hf(_hf_config(1).to_dict())
    assert config.attention_window == WINDOWS[1] and config.sep_token_id == SEP
    assert LongformerConfig(num_layers=3, attention_window=6).attention_window == [6, 6, 6]
    with pytest.raises(ValueError, match=r"attention_window\[1\] = 5"):
        LongformerConfig(num_layers=2, attention_window=[4, 5])
    with pytest.raises(ValueError, match="one per layer"):
        LongformerConfig(num_layers=2, attention_window=[4, 4, 4])


def test_question_answering_needs_a_separator():
    from bunmyaku.models.longformer import question_global_mask

    ids = torch.tensor([[0, 5, 6, 2, 2, 7, 2], [0, 5, 6, 7, 8, 9, 1]])
    with pytest.raises(ValueError, match=r"rows \[1\] have no separator token \(id 2\)"):
        question_global_mask(ids, SEP)
    assert question_global_mask(ids[:1], SEP).tolist() == [[1, 1, 1, 0, 0, 0, 0]]


def test_longformer_tokenizer_is_robertas(tmp_path):
    """A ``LongformerTokenizer`` folder (vocab.json + merges.txt) encodes pairs as ``<s> a </s></s> b </s>``."""
    import json

    from bunmyaku.tokenization import Tokenizer

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *"abcdĠ", "ab", "<mask>"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LongformerTokenizer"}))
    ours = Tokenizer.from_pretrained(tmp_path)(["ab c"], ["d a"], return_tensors=None)["input_ids"]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)(["ab c"], ["d a"])["input_ids"]
    assert ours == theirs and ours[0][0] == 0 and ours[0].count(2) == 3


@pytest.mark.parametrize("task", ["masked-lm", "question-answering"])  # global: <s> only, and the question tokens
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_longformer_flex_route_matches_transformers_on_cpu(tmp_path, flex_on_cpu, task, index):
    """The model's CUDA route (window and global tokens on one BlockMask, then the global rows from Longformer's own
    global projections) run eagerly on the CPU: transformers' outputs, padding positions included."""
    suffix, fields, extra = HEADS[task]
    hf_model = randomize(getattr(transformers, "Longformer" + suffix)(_hf_config(index, **extra)), seed=index)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    ids, mask = _batch(index, seed=2)
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask)
        ours = model(input_ids=ids, attention_mask=mask)
    assert flex_on_cpu == ["sparse"] * CONFIGS[index]["num_hidden_layers"]
    _compare(ours, expected, fields)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_longformer_on_cuda_flex_attention_matches_transformers(tmp_path):
    config = _hf_config(0)
    config.hidden_size, config.num_attention_heads, config.intermediate_size = 128, 2, 64  # head dim 64, as flex likes
    hf_model = randomize(transformers.LongformerForQuestionAnswering(config), seed=1)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"), device="cuda")
    ids, mask = _batch(0, seed=1)
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask)
        out = model(input_ids=ids.cuda(), attention_mask=mask.cuda())  # window + question tokens on flex_attention
    assert sparse_attention._compiled_flex is not None
    for field in ("start_logits", "end_logits"):
        assert_close(out[field].cpu(), expected[field], atol=1e-4)
