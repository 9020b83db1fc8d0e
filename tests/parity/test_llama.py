"""Llama parity with ``transformers``: every head, four tiny configs, left-padded batches, both directions."""

from __future__ import annotations

import pytest
import torch

import bunmyaku
from tests.conftest import require_module
from tests.parity.helpers import assert_close, left_padded_batch, randomize, save

transformers = require_module("transformers")

LLAMA3_ROPE = dict(
    rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
)
CONFIGS = [
    # grouped-query attention, untied LM head
    dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        pad_token_id=0,
    ),
    # head_dim override (6 x 10 != 36), biases everywhere, tied, another rope_theta
    dict(
        vocab_size=101,
        hidden_size=36,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=10,
        intermediate_size=50,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
        pad_token_id=0,
    ),
    # multi-query attention, llama3 RoPE scaling, tied
    dict(
        vocab_size=77,
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=3,
        num_key_value_heads=1,
        intermediate_size=31,
        tie_word_embeddings=True,
        rope_scaling=LLAMA3_ROPE,
        pad_token_id=0,
    ),
    # plain multi-head attention, odd width, untied
    dict(
        vocab_size=53,
        hidden_size=20,
        num_hidden_layers=2,
        num_attention_heads=5,
        intermediate_size=29,
        rope_theta=1e6,
        pad_token_id=0,
    ),
]

# task -> (HF class name, output fields to compare, extra config)
HEADS = {
    "base": ("LlamaModel", ["last_hidden_state"], {}),
    "causal-lm": ("LlamaForCausalLM", ["logits"], {}),
    "sequence-classification": ("LlamaForSequenceClassification", ["logits"], {"num_labels": 3}),
    "token-classification": ("LlamaForTokenClassification", ["logits"], {"num_labels": 5}),
    "question-answering": ("LlamaForQuestionAnswering", ["start_logits", "end_logits"], {}),
}


def _inputs(config: dict, seed: int):
    """Left-padded ids (padding holds the pad id), the mask, and the positions HF needs to be told."""
    ids, mask, positions = left_padded_batch(config["vocab_size"], seed=seed)
    return ids.masked_fill(mask == 0, config["pad_token_id"]), mask, positions


def _compare(ours, theirs, fields, mask):
    for field in fields:
        a, b = ours[field], getattr(theirs, field)
        assert_close(a, b, mask if a.shape[:2] == mask.shape else None)


@pytest.mark.parametrize("task", list(HEADS))
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_llama_parity_both_directions(tmp_path, task, index):
    hf_name, fields, extra = HEADS[task]
    hf_class = getattr(transformers, hf_name)
    hf_model = randomize(hf_class(transformers.LlamaConfig(**CONFIGS[index], **extra)), seed=index)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"), task=task)
    assert type(model).task == task
    ids, mask, positions = _inputs(CONFIGS[index], seed=index)
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions)
        _compare(model(input_ids=ids, attention_mask=mask), expected, fields, mask)  # positions from the mask
        # and back: bunmyaku saves, transformers loads
        reloaded = hf_class.from_pretrained(save(model, tmp_path / "ours")).eval()
        _compare(reloaded(input_ids=ids, attention_mask=mask, position_ids=positions), expected, fields, mask)


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_llama_hidden_states_match(tmp_path, index):
    hf_model = randomize(transformers.LlamaModel(transformers.LlamaConfig(**CONFIGS[index])), seed=10 + index)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    ids, mask, positions = _inputs(CONFIGS[index], seed=index)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        theirs = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    assert len(ours) == len(theirs.hidden_states) == CONFIGS[index]["num_hidden_layers"] + 1
    for a, b in zip(ours, theirs.hidden_states, strict=True):
        assert_close(a, b, mask)


def test_llama_losses_match(tmp_path):
    config = CONFIGS[0]
    ids, mask, positions = _inputs(config, seed=4)
    # A row's first real token is predicted from a padding position, whose output is unspecified: not scored
    lm_labels = ids.masked_fill(mask.cumsum(-1) <= 1, -100)
    tags = torch.randint(0, 4, ids.shape, generator=torch.Generator().manual_seed(0)).masked_fill(mask == 0, -100)
    spans = {"start_positions": torch.tensor([1, 4, 20]), "end_positions": torch.tensor([2, 6, 20])}
    cases = [
        ("LlamaForCausalLM", "causal-lm", {}, {"labels": lm_labels}),
        (
            "LlamaForSequenceClassification",
            "sequence-classification",
            {"num_labels": 3},
            {"labels": torch.tensor([0, 2, 1])},
        ),
        ("LlamaForTokenClassification", "token-classification", {"num_labels": 4}, {"labels": tags}),
        ("LlamaForQuestionAnswering", "question-answering", {}, spans),
    ]
    for hf_name, task, extra, labels in cases:
        hf_model = randomize(getattr(transformers, hf_name)(transformers.LlamaConfig(**config, **extra)), seed=3)
        model = bunmyaku.from_pretrained(save(hf_model, tmp_path / hf_name), task=task)
        # QA's softmax runs over every position, padding included, so its batch has none
        batch_mask = torch.ones_like(mask) if task == "question-answering" else mask
        batch_positions = torch.arange(ids.size(1))[None] if task == "question-answering" else positions
        with torch.no_grad():
            ours = model(input_ids=ids, attention_mask=batch_mask, **labels).loss
            theirs = hf_model(input_ids=ids, attention_mask=batch_mask, position_ids=batch_positions, **labels).loss
        assert_close(ours, theirs)


def test_llama_sequence_classification_right_padding(tmp_path):
    """With right padding the score is read at the last non-pad token, as HF does."""
    config = transformers.LlamaConfig(**CONFIGS[1], num_labels=2)
    hf_model = randomize(transformers.LlamaForSequenceClassification(config), seed=6)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    ids, mask, _ = _inputs(CONFIGS[1], seed=6)
    ids, mask = ids.flip(-1), mask.flip(-1)  # right padding: positions 0.. are the default on both sides
    with torch.no_grad():
        assert_close(
            model(input_ids=ids, attention_mask=mask).logits, hf_model(input_ids=ids, attention_mask=mask).logits
        )


def test_llama_sequence_classification_without_pad_token(tmp_path):
    """No pad_token_id: HF refuses a batch of several rows and reads one row at its last position, padded or not
    (the attention mask is not consulted)."""
    config = transformers.LlamaConfig(**{**CONFIGS[0], "pad_token_id": None}, num_labels=2)
    hf_model = randomize(transformers.LlamaForSequenceClassification(config), seed=8)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    ids, mask, _ = _inputs(CONFIGS[0], seed=8)
    with pytest.raises(ValueError, match="batch sizes > 1"), torch.no_grad():
        hf_model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="pad_token_id"), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    # one right-padded row; positions given, as our default gives padding positions values of its own
    positions = torch.arange(ids.size(1))[None]
    row = dict(input_ids=ids[2:].flip(-1), attention_mask=mask[2:].flip(-1), position_ids=positions)
    assert row["attention_mask"][0, -1] == 0
    with torch.no_grad():
        assert_close(model(**row).logits, hf_model(**row).logits)


def test_llama_heads_share_a_base_across_hf_prefixes(tmp_path):
    """HF's QA head keeps the base under ``transformer.``, the others under ``model.``: either loads into any head."""
    hf_qa = randomize(transformers.LlamaForQuestionAnswering(transformers.LlamaConfig(**CONFIGS[0])), seed=7)
    lm = bunmyaku.from_pretrained(save(hf_qa, tmp_path / "qa"), task="causal-lm")
    ids, mask, positions = _inputs(CONFIGS[0], seed=7)
    with torch.no_grad():
        expected = hf_qa.transformer(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        assert_close(lm.backbone(input_ids=ids, attention_mask=mask).last_hidden_state, expected, mask)
        # and a causal-LM checkpoint into the QA head
        qa = bunmyaku.from_pretrained(save(lm, tmp_path / "lm"), task="question-answering")
        assert_close(qa.backbone(input_ids=ids, attention_mask=mask).last_hidden_state, expected, mask)


@pytest.mark.parametrize("size", [103, 90])
def test_resize_token_embeddings_untied_as_transformers(tmp_path, size):
    """Grown or shrunk: the token table and the untied LM head as transformers resizes them."""
    hf_model = randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIGS[0])), seed=11)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"), task="causal-lm")
    old_head = hf_model.lm_head.weight.detach().clone()
    torch.manual_seed(0)
    hf_model.resize_token_embeddings(size)
    model.resize_token_embeddings(size)
    assert model.config.vocab_size == size and model.head.lm_head.weight.shape == (size, 32)
    assert model.head.lm_head.weight is not model.backbone.embed.weight
    assert_close(model.backbone.embed.weight, hf_model.model.embed_tokens.weight, atol=1e-4)
    assert_close(model.head.lm_head.weight, hf_model.lm_head.weight, atol=1e-4)
    if size > 99:
        assert torch.equal(model.head.lm_head.weight[99:], old_head.mean(0).expand(size - 99, -1))
    ids = torch.tensor([[5, size - 1, 7, size - 2]])
    with torch.no_grad():  # the RMSNorm of a row near the mean magnifies transformers' sampling noise: 1e-3
        assert_close(model(input_ids=ids).logits, hf_model(input_ids=ids).logits, atol=1e-3)
