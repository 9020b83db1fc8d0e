"""BERT and RoBERTa parity with ``transformers``: every head, three tiny configs, both directions."""

from __future__ import annotations

import pytest
import torch

import bunmyaku
from tests.conftest import require_module
from tests.parity.helpers import assert_close, randomize, right_padded_batch, save

transformers = require_module("transformers")

CONFIGS = [
    dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
    dict(
        vocab_size=101,
        hidden_size=36,
        num_hidden_layers=3,
        num_attention_heads=3,
        intermediate_size=50,
        hidden_act="gelu_new",
        type_vocab_size=3,
        layer_norm_eps=1e-7,
    ),
    dict(
        vocab_size=77,
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=6,
        intermediate_size=31,
        hidden_act="relu",
        max_position_embeddings=40,
    ),
]

# task -> (HF class suffix, output fields to compare, extra config)
HEADS = {
    "base": ("Model", ["last_hidden_state", "pooler_output"], {}),
    "masked-lm": ("ForMaskedLM", ["logits"], {}),
    "next-sentence": ("ForNextSentencePrediction", ["logits"], {}),
    "pretraining": ("ForPreTraining", ["prediction_logits", "seq_relationship_logits"], {}),
    "sequence-classification": ("ForSequenceClassification", ["logits"], {"num_labels": 3}),
    "token-classification": ("ForTokenClassification", ["logits"], {"num_labels": 5}),
    "question-answering": ("ForQuestionAnswering", ["start_logits", "end_logits"], {}),
    "multiple-choice": ("ForMultipleChoice", ["logits"], {}),
}
# RoBERTa: no NSP in the recipe, so no next-sentence or pretraining heads (HF has none either)
FAMILIES = {"Bert": list(HEADS), "Roberta": [t for t in HEADS if t not in ("next-sentence", "pretraining")]}
CASES = [(family, task) for family, tasks in FAMILIES.items() for task in tasks]


def _hf_config(family: str, index: int, **extra):
    config = dict(CONFIGS[index], **extra)
    if family == "Roberta":  # RoBERTa positions start after the padding index
        config.update(
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            max_position_embeddings=config.get("max_position_embeddings", 64) + 2,
        )
    return getattr(transformers, f"{family}Config")(**config)


def _inputs(config: dict, task: str, seed: int):
    ids, mask = right_padded_batch(config["vocab_size"], seed=seed)
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    if task == "multiple-choice":  # (B, N, T): 2 questions x 3 choices
        return dict(
            input_ids=ids.view(1, 3, -1).repeat(2, 1, 1),
            attention_mask=mask.view(1, 3, -1).repeat(2, 1, 1),
            token_type_ids=types.view(1, 3, -1).repeat(2, 1, 1),
        ), None
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types), mask


def _compare(ours, theirs, fields, mask):
    for field in fields:
        a, b = ours[field], getattr(theirs, field)
        assert_close(a, b, mask if a.dim() >= 2 and a.shape[:2] == mask.shape else None)


@pytest.mark.parametrize(("family", "task"), CASES)
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_encoder_parity_both_directions(tmp_path, family, task, index):
    suffix, fields, extra = HEADS[task]
    hf_class = getattr(transformers, family + suffix)
    hf_model = randomize(hf_class(_hf_config(family, index, **extra)), seed=index)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"), task=task)
    assert type(model).task == task and type(model).__name__ == family + suffix
    inputs, mask = _inputs(CONFIGS[index], task, seed=index)
    if family == "Roberta":  # padding must carry the padding id, which RoBERTa's positions rely on
        inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, 1)
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"]) if index != 1 else inputs["token_type_ids"]
    mask = mask if mask is not None else torch.ones(2, 3)
    with torch.no_grad():
        expected = hf_model(**inputs)
        _compare(model(**inputs), expected, fields, mask)
        # and back: bunmyaku saves, transformers loads
        reloaded = hf_class.from_pretrained(save(model, tmp_path / "ours")).eval()
        _compare({f: getattr(reloaded(**inputs), f) for f in fields}, expected, fields, mask)


def test_bert_losses_match(tmp_path):
    config = transformers.BertConfig(**CONFIGS[0], num_labels=3)
    inputs, mask = _inputs(CONFIGS[0], "masked-lm", seed=1)
    labels = inputs["input_ids"].masked_fill(torch.rand(inputs["input_ids"].shape) < 0.7, -100)
    cases = [
        ("BertForMaskedLM", "masked-lm", {"labels": labels}),
        ("BertForSequenceClassification", "sequence-classification", {"labels": torch.tensor([0, 2, 1])}),
        (
            "BertForQuestionAnswering",
            "question-answering",
            {"start_positions": torch.tensor([1, 3, 20]), "end_positions": torch.tensor([2, 5, 20])},
        ),
        ("BertForPreTraining", "pretraining", {"labels": labels, "next_sentence_label": torch.tensor([0, 1, 1])}),
    ]
    for hf_name, task, labels_kw in cases:
        hf_config = transformers.BertConfig(**CONFIGS[0]) if task == "question-answering" else config
        hf_model = randomize(getattr(transformers, hf_name)(hf_config), seed=3)
        model = bunmyaku.from_pretrained(save(hf_model, tmp_path / hf_name), task=task)
        with torch.no_grad():
            assert_close(model(**inputs, **labels_kw).loss, hf_model(**inputs, **labels_kw).loss)


@pytest.mark.parametrize("problem_type", ["regression", "multi_label_classification"])
def test_bert_sequence_problem_types(tmp_path, problem_type):
    num_labels = 1 if problem_type == "regression" else 4
    config = transformers.BertConfig(**CONFIGS[1], num_labels=num_labels, problem_type=problem_type)
    hf_model = randomize(transformers.BertForSequenceClassification(config), seed=5)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    inputs, _ = _inputs(CONFIGS[1], "sequence-classification", seed=2)
    labels = torch.rand(3) * 5 if num_labels == 1 else (torch.rand(3, 4) > 0.5).float()
    with torch.no_grad():
        assert_close(model(**inputs, labels=labels).loss, hf_model(**inputs, labels=labels).loss)


def test_sharded_checkpoints_both_directions(tmp_path):
    """Sharded safetensors with an index: HF's shards load in bunmyaku, and ours in HF."""
    hf_model = randomize(transformers.BertForMaskedLM(_hf_config("Bert", 0)), seed=11)
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model = bunmyaku.from_pretrained(tmp_path / "hf")
    inputs, mask = _inputs(CONFIGS[0], "masked-lm", seed=0)
    with torch.no_grad():
        expected = hf_model(**inputs).logits
        assert_close(model(**inputs).logits, expected, mask)
        model.save_pretrained(tmp_path / "ours", max_shard_size="20KB")
        assert len(list((tmp_path / "ours").glob("model-*-of-*.safetensors"))) > 1
        reloaded = transformers.BertForMaskedLM.from_pretrained(tmp_path / "ours").eval()
        assert_close(reloaded(**inputs).logits, expected, mask)


@pytest.mark.parametrize("family", ["Bert", "Roberta"])
@pytest.mark.parametrize("task", ["masked-lm", "token-classification", "question-answering"])
@pytest.mark.parametrize("labels_at_padding", [False, True])
def test_losses_read_padding_as_hf_does(tmp_path, monkeypatch, family, task, labels_at_padding):
    """Unpadded by default, a batch leaves padding positions at zero; a loss that reads them (per-token labels at
    padding, QA's span softmax over every position) must still be HF's, and a loss that does not runs unpadded."""
    from bunmyaku.models import bert, fastpath

    suffix, _, extra = HEADS[task]
    hf_model = randomize(getattr(transformers, family + suffix)(_hf_config(family, 0, **extra)), seed=7)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"), task=task)
    inputs, mask = _inputs(CONFIGS[0], task, seed=4)
    inputs["input_ids"] = inputs["input_ids"].masked_fill(mask == 0, hf_model.config.pad_token_id)
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    gen = torch.Generator().manual_seed(0)
    if task == "question-answering":
        labels = {"start_positions": torch.tensor([1, 3, 20]), "end_positions": torch.tensor([2, 5, 20])}
    else:
        targets = torch.randint(0, 5, mask.shape, generator=gen)
        labels = {"labels": targets if labels_at_padding else targets.masked_fill(mask == 0, -100)}
    packings = []
    original = fastpath.Packing.from_mask
    monkeypatch.setattr(bert.Packing, "from_mask", lambda m: packings.append(1) or original(m))
    with torch.no_grad():
        assert_close(model(**inputs, **labels).loss, hf_model(**inputs, **labels).loss)
    reads_padding = labels_at_padding or task == "question-answering"
    assert packings == ([] if reads_padding else [1]), "a loss that reads no padding runs unpadded"
