"""The pipeline verbs of the ``bunmyaku`` command, on random tiny models (text and --json output)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import bunmyaku
from bunmyaku.cli import app
from tests.conftest import require_module
from tests.parity.helpers import randomize
from tests.pipelines.tiny_models import NER_LABELS, bert_head_dir, marian_dir

transformers = require_module("transformers")

runner = CliRunner()
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def models(minilm_dir, tmp_path_factory):
    """Tiny random checkpoints for every verb, keyed by verb."""
    root = tmp_path_factory.mktemp("cli")
    return {
        "fill-mask": bert_head_dir(root / "mlm", minilm_dir, "BertForMaskedLM"),
        "similarity": bert_head_dir(root / "base", minilm_dir, "BertModel"),
        "classify": bert_head_dir(
            root / "cls", minilm_dir, "BertForSequenceClassification", id2label={0: "neg", 1: "pos"}
        ),
        "ner": bert_head_dir(
            root / "ner", minilm_dir, "BertForTokenClassification", id2label=dict(enumerate(NER_LABELS))
        ),
        "qa": bert_head_dir(root / "qa", minilm_dir, "BertForQuestionAnswering"),
        "translate": marian_dir(root / "marian"),
    }


@pytest.fixture(scope="module")
def gpt2_dir(shared_data, tmp_path_factory):
    """A random tiny GPT-2 on the real GPT-2 tokenizer, with a chat template for --chat."""
    path = tmp_path_factory.mktemp("gpt2")
    tokenizer = bunmyaku.Tokenizer.from_pretrained(shared_data / "gpt2-tokenizer")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    config = transformers.GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    torch.manual_seed(0)
    randomize(transformers.GPT2LMHeadModel(config), seed=0, scale=0.5).save_pretrained(path)
    return path


def invoke(*args: str, input: str | None = None):
    result = runner.invoke(app, [str(a) for a in args], input=input)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_fill_mask_and_similarity(models, tmp_path):
    out = json.loads(invoke("fill-mask", "--model", models["fill-mask"], "the [MASK] sat.", "--top-k", "3", "--json"))
    assert len(out) == 1 and len(out[0]) == 3 and {"token_str", "score"} <= set(out[0][0])
    assert "the [MASK] sat." in invoke("fill-mask", "-m", models["fill-mask"], "the [MASK] sat.")

    sentences = ["a cat sat", "a dog ran", "stocks fell"]
    out = json.loads(invoke("similarity", "-m", models["similarity"], *sentences, "--json"))
    assert len(out["similarity"]) == 3 and out["similarity"][0][0] == pytest.approx(1.0, abs=1e-5)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    out = json.loads(invoke("similarity", "-m", models["similarity"], "a cat sat", "--search", corpus, "--json"))
    assert out[0]["hits"][0]["text"] == "a cat sat"
    text = invoke("similarity", "-m", models["similarity"], "a cat", "--search", corpus, "--top-k", "1")
    assert text.splitlines()[0] == "a cat" and len(text.splitlines()) == 2


def test_classify_ner_qa(models):
    texts = ["I loved it", "I hated it"]
    out = json.loads(invoke("classify", "-m", models["classify"], *texts, "--top-k", "0", "--json"))
    assert [len(r["labels"]) for r in out] == [2, 2] and {r["label"] for r in out[0]["labels"]} == {"neg", "pos"}
    assert invoke("classify", "-m", models["classify"], input="I loved it\n").strip().endswith("I loved it")

    text = "Wolfgang lives in Berlin and works in 東京."
    out = json.loads(invoke("ner", "-m", models["ner"], text, "--aggregation", "first", "--json"))
    assert out[0]["entities"] and all(text[e["start"] : e["end"]] for e in out[0]["entities"])
    assert text in invoke("ner", "-m", models["ner"], text)

    context = "BERT was released by Google in 2018."
    out = json.loads(invoke("qa", "-m", models["qa"], "Who released BERT?", "--context", context, "--json"))
    answer = out[0]["answers"][0]
    assert context[answer["start"] : answer["end"]] == answer["answer"]
    result = runner.invoke(app, ["qa", "-m", str(models["qa"]), "Who?"])
    assert result.exit_code != 0 and "context" in result.output


def test_translate(models):
    texts = ["the cat sat on the mat", "hello world"]
    greedy = json.loads(invoke("translate", "-m", models["translate"], *texts, "--max-new-tokens", "6", "--json"))
    assert [r["text"] for r in greedy] == texts
    expected = bunmyaku.pipeline("translation", model=models["translate"], device="cpu")(texts, max_new_tokens=6)
    assert [r["translation_text"] for r in greedy] == [r["translation_text"] for r in expected]
    beams = invoke("translate", "-m", models["translate"], *texts, "--num-beams", "2", "--max-new-tokens", "6")
    assert len(beams.splitlines()) == 2


def test_generate(gpt2_dir):
    prompt = "Once upon a time"
    plain = invoke("generate", "-m", gpt2_dir, prompt, "--max-new-tokens", "8")
    assert plain.startswith(prompt)
    streamed = invoke("generate", "-m", gpt2_dir, prompt, "--max-new-tokens", "8", "--stream")
    assert prompt + streamed.rstrip("\n") == plain.rstrip("\n")
    out = json.loads(invoke("generate", "-m", gpt2_dir, prompt, "--max-new-tokens", "8", "--json"))
    assert prompt + out[0]["generated_text"] == plain.rstrip("\n")
    stop = out[0]["generated_text"][3:5]
    cut = json.loads(invoke("generate", "-m", gpt2_dir, prompt, "--max-new-tokens", "8", "--stop", stop, "--json"))
    assert cut[0]["generated_text"] == out[0]["generated_text"][: out[0]["generated_text"].index(stop)]
    sampled = ["--do-sample", "--top-k", "20", "--top-p", "0.9", "--temperature", "0.8", "--seed", "1", "--json"]
    first = invoke("generate", "-m", gpt2_dir, prompt, "--max-new-tokens", "6", *sampled)
    assert first == invoke("generate", "-m", gpt2_dir, prompt, "--max-new-tokens", "6", *sampled)


def test_generate_num_beams_gives_the_beam_search_output(gpt2_dir):
    """--num-beams 3 prints transformers' beam search continuation, which greedy search does not produce."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    prompt = "Once upon a time"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=10, num_beams=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    beams = invoke("generate", "-m", gpt2_dir, prompt, "--num-beams", "3", "--max-new-tokens", "10", "--json")
    greedy = invoke("generate", "-m", gpt2_dir, prompt, "--max-new-tokens", "10", "--json")
    continuation = tokenizer.decode(expected[0, ids.size(1) :], skip_special_tokens=True)
    assert json.loads(beams)[0]["generated_text"] == continuation != json.loads(greedy)[0]["generated_text"]


def test_generate_chat_puts_the_system_prompt_in_the_template(gpt2_dir, monkeypatch):
    """--chat --system: the ids generation starts from are transformers' rendering of the chat template."""
    from bunmyaku.pipelines import text_generation

    seen = []

    def recording_generate(model, input_ids, *args, **kwargs):
        seen.append(input_ids.tolist())
        return generate(model, input_ids, *args, **kwargs)

    generate = text_generation.generate
    monkeypatch.setattr(text_generation, "generate", recording_generate)
    invoke("generate", "-m", gpt2_dir, "hi", "--chat", "--system", "be brief", "--max-new-tokens", "4", "--json")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert expected == "system: be brief\nuser: hi\nassistant:"  # the template, rendered by transformers
    assert seen == [[tokenizer(expected, add_special_tokens=False)["input_ids"]]]
