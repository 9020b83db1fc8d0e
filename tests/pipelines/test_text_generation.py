"""text-generation pipeline: greedy and beam output equal transformers', batching, stop strings, streaming,
long prompts and bad options."""

from __future__ import annotations

import pytest
import torch

import bunmyaku
from tests.conftest import require_module
from tests.parity.helpers import randomize

transformers = require_module("transformers")


@pytest.fixture(scope="module")
def gpt2_dir(shared_data, tmp_path_factory):
    """A random tiny GPT-2 on the real GPT-2 byte-level BPE files."""
    path = tmp_path_factory.mktemp("gpt2")
    bunmyaku.Tokenizer.from_pretrained(shared_data / "gpt2-tokenizer").save_pretrained(path)
    config = transformers.GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    torch.manual_seed(0)
    randomize(transformers.GPT2LMHeadModel(config), seed=0, scale=0.5).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(gpt2_dir):
    return bunmyaku.pipeline("text-generation", model=gpt2_dir, device="cpu")


def test_greedy_matches_transformers(pipe, gpt2_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    prompt = "The meaning of life is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    continuation = tokenizer.decode(expected[0, ids.size(1) :])
    assert pipe(prompt, max_new_tokens=12, return_full_text=False)[0]["generated_text"] == continuation
    # transformers' default return_full_text=True: the prompt, then the continuation
    assert pipe(prompt, max_new_tokens=12) == [{"generated_text": prompt + continuation}]


def test_batch_equals_single_and_full_text(pipe):
    prompts = ["Hello", "A much longer prompt that needs left padding in the batch"]
    batched = pipe(prompts, max_new_tokens=8, return_full_text=False)
    for prompt, result in zip(prompts, batched, strict=True):
        assert result == pipe(prompt, max_new_tokens=8, return_full_text=False)
    full = pipe("Hello", max_new_tokens=8)[0]["generated_text"]
    assert full == "Hello" + batched[0][0]["generated_text"]


def test_stop_strings_sampling_beams_and_streaming(pipe):
    text = pipe("Once upon a time", max_new_tokens=16, return_full_text=False)[0]["generated_text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert (
        stop
        and pipe("Once upon a time", max_new_tokens=16, stop=[stop])[0]["generated_text"]
        == "Once upon a time" + text[: text.index(stop)]
    )
    sampled = pipe("Once upon a time", max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, seed=3)
    assert sampled == pipe("Once upon a time", max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, seed=3)
    assert "".join(pipe.stream("Once upon a time", max_new_tokens=16)) == text
    with pytest.raises(ValueError, match="no chat template"):
        pipe([{"role": "user", "content": "hi"}])


def test_beam_search_matches_transformers(pipe, gpt2_dir):
    """num_beams changes the output, to exactly transformers' beam search output."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    prompt = "Once upon a time"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    greedy = pipe(prompt, max_new_tokens=10, return_full_text=False)[0]["generated_text"]
    for num_beams, length_penalty in [(3, 1.0), (4, 0.5)]:
        expected = model.generate(
            ids,
            max_new_tokens=10,
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=False,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
        got = pipe(
            prompt, max_new_tokens=10, num_beams=num_beams, length_penalty=length_penalty, return_full_text=False
        )[0]["generated_text"]
        assert got == tokenizer.decode(expected[0, ids.size(1) :], skip_special_tokens=True)
        assert got != greedy


def test_a_prompt_too_long_for_the_positions_keeps_its_end(pipe, gpt2_dir):
    """n_positions is 128: a 200-token prompt with 8 new tokens continues its last 120 tokens, as transformers
    does given those tokens alone."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    prompt = " ".join(f"w{i}" for i in range(100))
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids.size(1) > 128
    expected = model.generate(ids[:, -120:], max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert pipe(prompt, max_new_tokens=8, return_full_text=False)[0]["generated_text"] == tokenizer.decode(
        expected[0, 120:]
    )
    with pytest.raises(ValueError, match="max_new_tokens 128 leaves no room"):
        pipe("hi", max_new_tokens=128)


@pytest.mark.parametrize(
    ("option", "value"),
    [("num_beams", 0), ("max_new_tokens", -1), ("top_k", 0), ("top_p", 0.0), ("temperature", 0.0)],
)
def test_bad_options_are_refused_by_name(pipe, option, value):
    with pytest.raises(ValueError, match=option):
        pipe("Once upon a time", **{"max_new_tokens": 4, "do_sample": option != "num_beams", option: value})


def test_empty_prompts_and_errors_while_streaming_are_raised(pipe):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pipe(["a", ""], max_new_tokens=2)
    with pytest.raises(ValueError, match="num_beams > 1 cannot be combined with do_sample, streamer"):
        list(pipe.stream("Once upon a time", max_new_tokens=2, num_beams=2))  # raised in the decoding thread
