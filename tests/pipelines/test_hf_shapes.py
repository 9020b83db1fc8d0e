"""Pipeline outputs have transformers' shape (and values) for the same inputs, on the same tiny random folders:
single vs list inputs, with and without ``top_k``, ``return_full_text``, the task aliases, feature extraction
and zero-shot classification."""

from __future__ import annotations

import math

import pytest
import torch

import bunmyaku
from tests.conftest import require_module
from tests.parity.helpers import randomize
from tests.pipelines.tiny_models import NER_LABELS, bert_head_dir

transformers = require_module("transformers")

TEXTS = ["John Smith lives in Paris and works for Acme.", "What a lovely day", "no"]


def assert_same(got, expected, path="output", atol=1e-5):
    """The same nesting of lists and dicts, the same keys, strings and ints, floats within ``atol``."""
    if isinstance(expected, dict):
        assert isinstance(got, dict), f"{path}: {type(got).__name__} where transformers has a dict"
        assert set(got) == set(expected), f"{path}: keys {sorted(got)} vs {sorted(expected)}"
        for key in expected:
            assert_same(got[key], expected[key], f"{path}[{key!r}]", atol)
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, list), f"{path}: {type(got).__name__} where transformers has a list"
        assert len(got) == len(expected), f"{path}: {len(got)} items vs {len(expected)}"
        for index, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same(a, b, f"{path}[{index}]", atol)
    elif isinstance(expected, float):
        assert isinstance(got, float) and math.isclose(got, expected, abs_tol=atol), f"{path}: {got} vs {expected}"
    else:
        assert type(got) is type(expected) and got == expected, f"{path}: {got!r} vs {expected!r}"


def hf_pipeline(task, path, **kwargs):
    return transformers.pipeline(task, model=str(path), device="cpu", **kwargs)


@pytest.fixture(scope="module")
def classifier_dir(minilm_dir, tmp_path_factory):
    labels = {0: "negative", 1: "positive", 2: "neutral"}
    return bert_head_dir(tmp_path_factory.mktemp("cls"), minilm_dir, "BertForSequenceClassification", id2label=labels)


@pytest.mark.parametrize("task", ["text-classification", "sentiment-analysis"])
def test_text_classification_shapes(classifier_dir, task):
    ours, theirs = bunmyaku.pipeline(task, model=classifier_dir, device="cpu"), hf_pipeline(task, classifier_dir)
    for inputs in (TEXTS[0], TEXTS, [TEXTS[1]]):
        assert_same(ours(inputs), theirs(inputs))  # no top_k: the best label only, [dict] for one string
        for top_k in (1, 2, None):
            assert_same(ours(inputs, top_k=top_k), theirs(inputs, top_k=top_k))
    pair = {"text": "A man eats.", "text_pair": "Someone is eating."}
    assert_same(ours(pair), theirs(pair))
    assert_same(ours([pair, pair]), theirs([pair, pair]))
    assert ours(TEXTS[0]) == [ours(TEXTS[0], top_k=1)[0]]
    for function in ("sigmoid", "none"):
        assert_same(ours(TEXTS, function_to_apply=function), theirs(TEXTS, function_to_apply=function))


def test_text_classification_top_k_given_when_built(classifier_dir):
    """transformers wraps one string's labels in one more list when top_k was given to the pipeline itself."""
    ours = bunmyaku.pipeline("text-classification", model=classifier_dir, device="cpu", top_k=2)
    theirs = hf_pipeline("text-classification", classifier_dir, top_k=2)
    assert_same(ours(TEXTS[0]), theirs(TEXTS[0]))
    assert_same(ours(TEXTS), theirs(TEXTS))


@pytest.mark.parametrize("aggregation", ["none", "simple"])
def test_ner_alias_and_shapes(minilm_dir, tmp_path_factory, aggregation):
    path = bert_head_dir(
        tmp_path_factory.mktemp("ner"), minilm_dir, "BertForTokenClassification", id2label=dict(enumerate(NER_LABELS))
    )
    ours = bunmyaku.pipeline("ner", model=path, device="cpu", aggregation_strategy=aggregation)
    theirs = hf_pipeline("ner", path, aggregation_strategy=aggregation)
    for inputs in (TEXTS[0], TEXTS):
        got, expected = ours(inputs), theirs(inputs)
        # transformers returns numpy scalars for these; compare as Python numbers
        assert_same(got, _plain(expected), atol=1e-4)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


def test_fill_mask_shapes(minilm_dir, tmp_path_factory):
    path = bert_head_dir(tmp_path_factory.mktemp("mlm"), minilm_dir, "BertForMaskedLM")
    ours, theirs = bunmyaku.pipeline("fill-mask", model=path, device="cpu"), hf_pipeline("fill-mask", path)
    one, two = "Paris is the [MASK] of France.", "The [MASK] sat on the [MASK]."
    for inputs in (one, two, [one, two], [two, one, one]):
        assert_same(ours(inputs), theirs(inputs))
        assert_same(ours(inputs, top_k=2), theirs(inputs, top_k=2))


@pytest.fixture(scope="module")
def gpt2_dir(shared_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    bunmyaku.Tokenizer.from_pretrained(shared_data / "gpt2-tokenizer").save_pretrained(path)
    config = transformers.GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    torch.manual_seed(0)
    randomize(transformers.GPT2LMHeadModel(config), seed=0, scale=0.5).save_pretrained(path)
    return path


def test_text_generation_shapes_and_full_text(gpt2_dir):
    ours = bunmyaku.pipeline("text-generation", model=gpt2_dir, device="cpu")
    theirs = hf_pipeline("text-generation", gpt2_dir)
    settings = {"max_new_tokens": 6, "do_sample": False}
    prompts = ["Once upon a time", "The meaning of life is"]
    for inputs in (prompts[0], prompts):
        full = ours(inputs, **settings)
        assert_same(full, theirs(inputs, **settings))  # default: the prompt is part of generated_text
        assert_same(
            ours(inputs, return_full_text=False, **settings), theirs(inputs, return_full_text=False, **settings)
        )
    assert full[0][0]["generated_text"].startswith(prompts[0])


def test_text_generation_chat_full_text_is_the_conversation(gpt2_dir, tmp_path):
    """With a chat, the full text is the messages plus the assistant's reply, as in transformers."""
    import shutil

    shutil.copytree(gpt2_dir, tmp_path / "chat")
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    tokenizer = bunmyaku.Tokenizer.from_pretrained(tmp_path / "chat")
    tokenizer.chat_template = template
    tokenizer.save_pretrained(tmp_path / "chat")
    ours = bunmyaku.pipeline("text-generation", model=tmp_path / "chat", device="cpu")
    theirs = hf_pipeline("text-generation", tmp_path / "chat")
    chat = [{"role": "user", "content": "hello there"}]
    settings = {"max_new_tokens": 5, "do_sample": False}
    got = ours(chat, **settings)
    assert_same(got, theirs(chat, **settings))
    assert got[0]["generated_text"][:1] == chat and got[0]["generated_text"][1]["role"] == "assistant"
    assert_same(ours(chat, return_full_text=False, **settings), theirs(chat, return_full_text=False, **settings))


def test_feature_extraction_is_the_last_hidden_state_per_text(minilm_dir, tmp_path_factory):
    path = bert_head_dir(tmp_path_factory.mktemp("base"), minilm_dir, "BertModel")
    ours = bunmyaku.pipeline("feature-extraction", model=path, device="cpu", batch_size=2)
    theirs = hf_pipeline("feature-extraction", path)
    one = ours(TEXTS[0])
    assert len(one) == 1 and len(one[0][0]) == 32  # (1, T, C)
    for inputs in (TEXTS[0], TEXTS):
        assert_same(ours(inputs), theirs(inputs))
    tensor = ours(TEXTS[1], return_tensors=True)
    torch.testing.assert_close(tensor, theirs(TEXTS[1], return_tensors=True), atol=1e-5, rtol=1e-5)


NLI_ORDERS = {
    "mnli order": {0: "contradiction", 1: "neutral", 2: "entailment"},
    "entailment first": {0: "ENTAILMENT", 1: "NEUTRAL", 2: "CONTRADICTION"},
}


@pytest.mark.parametrize("order", list(NLI_ORDERS))
def test_zero_shot_matches_transformers(minilm_dir, tmp_path_factory, order):
    labels = NLI_ORDERS[order]
    path = bert_head_dir(
        tmp_path_factory.mktemp("nli"),
        minilm_dir,
        "BertForSequenceClassification",
        seed=3,
        id2label=labels,
        label2id={name: i for i, name in labels.items()},  # transformers' zero-shot pipeline reads label2id
    )
    ours = bunmyaku.pipeline("zero-shot-classification", model=path, device="cpu", batch_size=4)
    theirs = hf_pipeline("zero-shot-classification", path)
    labels = ["sports", "politics", "cooking", "travel"]
    for inputs in (TEXTS[0], TEXTS[:2]):
        for multi_label in (False, True):
            got = ours(inputs, labels, multi_label=multi_label)
            assert_same(got, theirs(inputs, candidate_labels=labels, multi_label=multi_label))
        template = "The topic is {}."
        got = ours(inputs, candidate_labels="sports, politics", hypothesis_template=template)
        assert_same(got, theirs(inputs, candidate_labels="sports, politics", hypothesis_template=template))
    single = ours(TEXTS[1], ["weather"])  # one label: entailment vs contradiction, as with multi_label
    assert_same(single, theirs(TEXTS[1], candidate_labels=["weather"]))
    scores = ours(TEXTS[0], labels)["scores"]
    assert scores == sorted(scores, reverse=True) and math.isclose(sum(scores), 1.0, rel_tol=1e-5)


def test_zero_shot_bad_input(minilm_dir, tmp_path_factory):
    path = bert_head_dir(
        tmp_path_factory.mktemp("nli"), minilm_dir, "BertForSequenceClassification", id2label=NLI_ORDERS["mnli order"]
    )
    ours = bunmyaku.pipeline("zero-shot-classification", model=path, device="cpu")
    with pytest.raises(ValueError, match="at least one candidate label"):
        ours("text", [])
    with pytest.raises(ValueError, match="has no {}"):
        ours("text", ["a"], hypothesis_template="no slot")


def test_unknown_task_lists_the_aliases():
    with pytest.raises(ValueError, match="sentiment-analysis"):
        bunmyaku.pipeline("sentiment", model="unused")


def test_question_answering_keeps_the_transformers_4_shapes(minilm_dir, tmp_path_factory):
    """transformers 5 dropped its question-answering pipeline; the shapes are those transformers 4 documented:
    a dict for one question, a list of dicts for a list (or for ``top_k`` > 1), keyword names question / context."""
    path = bert_head_dir(tmp_path_factory.mktemp("qa"), minilm_dir, "BertForQuestionAnswering")
    qa = bunmyaku.pipeline("question-answering", model=path, device="cpu")
    context = "John Smith lives in Paris and works for Acme."
    one = qa(question="Who lives in Paris?", context=context)
    assert isinstance(one, dict) and set(one) == {"answer", "score", "start", "end"}
    many = qa(question=["Who?", "Where?"], context=context)
    assert isinstance(many, list) and all(isinstance(a, dict) for a in many) and len(many) == 2
    top = qa(question="Who?", context=context, top_k=2)
    assert isinstance(top, list) and len(top) == 2 and top[0] == qa(question="Who?", context=context)
    nested = qa(question=["Who?", "Where?"], context=context, top_k=2)
    assert [len(answers) for answers in nested] == [2, 2]
