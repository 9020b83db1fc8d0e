"""``model.generate(input_ids, ...)`` with ``transformers``' keywords equals ``transformers``' ``generate``.

Tiny random GPT-2, Llama and Marian models, left-padded (decoders) or right-padded (Marian sources) batches with
their attention masks; greedy, beam (with several returned sequences, early stopping, length penalty), the
repetition penalty, min_new_tokens, max_length, and seeded sampling.
"""

from __future__ import annotations

import pytest
import torch

import bunmyaku
from tests.conftest import require_module
from tests.parity.helpers import randomize, right_padded_batch, save

transformers = require_module("transformers")

DECODERS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            vocab_size=61,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=37,
        ),
    ),  # fmt: skip
}


def _decoder(name: str, folder):
    config_class, model_class, fields = DECODERS[name]
    config = getattr(transformers, config_class)(**fields, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    hf_model = randomize(getattr(transformers, model_class)(config), seed=7, scale=0.3)
    return hf_model, bunmyaku.from_pretrained(save(hf_model, folder))


def _left_padded(seed: int = 1):
    ids, mask = right_padded_batch(61, batch=3, length=6, seed=seed)
    mask = mask.flip(-1)
    return ids.masked_fill(mask == 0, 0), mask


def _produced_token(hf_model, ids, mask, rank: int = 2) -> int:
    """A token the model does pick soon, to serve as the end token, so that rows finish at different steps."""
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    return int(out[-1, ids.size(1) + rank])


def _hf_generate(hf_model, ids, **kwargs):
    with torch.no_grad():
        return hf_model.generate(ids, **kwargs)


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_and_beam_equal_transformers_on_a_left_padded_batch(tmp_path, name):
    hf_model, model = _decoder(name, tmp_path / "hf")
    ids, mask = _left_padded()
    eos = _produced_token(hf_model, ids, mask)
    cases = [
        dict(max_new_tokens=9),
        dict(max_new_tokens=9, min_new_tokens=5),
        dict(max_new_tokens=9, num_beams=3, length_penalty=0.7),
        dict(max_new_tokens=9, num_beams=4, num_return_sequences=3, early_stopping=True),
        dict(max_length=13, num_beams=2, num_return_sequences=2),
    ]
    finished_early = False
    for case in cases:
        # pad_token_id = eos: transformers 5 fills a finished beam with the end token, bunmyaku with the pad id
        kwargs = dict(attention_mask=mask, eos_token_id=eos, pad_token_id=eos, **case)
        expected = _hf_generate(hf_model, ids, do_sample=False, **kwargs)
        actual = model.generate(ids, **kwargs)
        assert actual.dtype == torch.long
        assert actual.tolist() == expected.tolist(), case
        assert (
            actual[:, : ids.size(1)].tolist() == ids.repeat_interleave(case.get("num_return_sequences", 1), 0).tolist()
        )
        finished_early |= actual.size(1) < ids.size(1) + 9 or bool((actual[:, ids.size(1) : -1] == eos).any())
    assert finished_early  # the end token was produced, so the finishing and padding rules were exercised


@pytest.mark.parametrize("name", DECODERS)
def test_repetition_penalty_and_default_length_equal_transformers(tmp_path, name):
    hf_model, model = _decoder(name, tmp_path / "hf")
    # no padding: transformers counts the pad id as a seen token in padded rows, bunmyaku counts real tokens only
    ids = torch.randint(3, 61, (2, 5), generator=torch.Generator().manual_seed(3))
    plain = model.generate(ids, max_new_tokens=12, eos_token_id=1)
    for penalty in (1.8, 0.6):
        expected = _hf_generate(hf_model, ids, do_sample=False, max_new_tokens=12, repetition_penalty=penalty,
                                eos_token_id=1)  # fmt: skip
        actual = model.generate(ids, max_new_tokens=12, repetition_penalty=penalty, eos_token_id=1)
        assert actual.tolist() == expected.tolist()
        assert actual.tolist() != plain.tolist()  # the penalty changed the choice
    # no length given: 20 new tokens, transformers 5's default
    expected = _hf_generate(hf_model, ids, do_sample=False, eos_token_id=1)
    actual = model.generate(ids, eos_token_id=1)
    assert actual.shape == (2, 25)
    assert actual.tolist() == expected.tolist()


def test_sampling_is_reproducible_and_draws_as_transformers_does(tmp_path):
    hf_model, model = _decoder("gpt2", tmp_path / "hf")
    ids, mask = _left_padded(seed=4)
    settings = dict(attention_mask=mask, do_sample=True, max_new_tokens=10, temperature=1.5, top_k=20, eos_token_id=1)
    first = model.generate(ids, seed=5, **settings)
    assert model.generate(ids, seed=5, **settings).tolist() == first.tolist()
    assert model.generate(ids, seed=6, **settings).tolist() != first.tolist()
    # from the global random state, the draws are transformers' draws
    torch.manual_seed(11)
    ours = model.generate(ids, num_return_sequences=2, **settings)
    torch.manual_seed(11)
    theirs = _hf_generate(hf_model, ids, num_return_sequences=2, **settings)
    assert ours.shape == (6, ids.size(1) + 10)
    assert ours.tolist() == theirs.tolist()


def test_unknown_or_impossible_options_are_refused(tmp_path):
    _, model = _decoder("llama", tmp_path / "hf")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(TypeError, match="does not support no_repeat_ngram_size; it takes input_ids, attention_mask"):
        model.generate(ids, no_repeat_ngram_size=2)
    with pytest.raises(ValueError, match="num_return_sequences > 1 needs do_sample=True"):
        model.generate(ids, num_return_sequences=2)
    with pytest.raises(ValueError, match="between 1 and num_beams"):
        model.generate(ids, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="max_length \\(3\\) leaves no room"):
        model.generate(ids, max_length=3)
    with pytest.raises(ValueError, match="a \\(batch, length\\) tensor of token ids, got \\(3,\\)"):
        model.generate(ids[0])
    with pytest.raises(TypeError, match="attention_mask must be a \\(batch, length\\) tensor, got dict"):
        model.generate(ids, {"max_new_tokens": 3})
    with pytest.raises(ValueError, match="min_new_tokens must be >= 0"):
        model.generate(ids, min_new_tokens=-1, max_new_tokens=2)


MARIAN = dict(
    vocab_size=67, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
    pad_token_id=66, decoder_start_token_id=66, eos_token_id=0,
)  # fmt: skip


def test_seq2seq_generate_equals_transformers(tmp_path):
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    config = transformers.MarianConfig(**MARIAN, forced_eos_token_id=None)
    hf_model = randomize(transformers.MarianMTModel(config), seed=2)
    with torch.no_grad():
        for module in hf_model.modules():
            if isinstance(module, MarianSinusoidalPositionalEmbedding):
                module.weight.copy_(module.create_weight())
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    ids, mask = right_padded_batch(66, seed=3)
    pad = MARIAN["pad_token_id"]
    probe = _hf_generate(hf_model, ids, attention_mask=mask, max_new_tokens=4, bad_words_ids=[[pad]])
    eos = int(probe[-1, 3])
    cases = [
        dict(max_new_tokens=8),
        dict(max_new_tokens=8, min_new_tokens=4),
        dict(max_new_tokens=8, repetition_penalty=1.5),
        dict(max_length=7, num_beams=3, num_return_sequences=2, length_penalty=0.5),
        dict(max_new_tokens=8, num_beams=3, early_stopping=True),
    ]
    for case in cases:
        kwargs = dict(attention_mask=mask, eos_token_id=eos, **case)
        expected = _hf_generate(hf_model, ids, do_sample=False, bad_words_ids=[[pad]], **kwargs)
        actual = model.generate(ids, **kwargs)
        assert actual.tolist() == expected.tolist(), case
        assert (actual[:, 0] == MARIAN["decoder_start_token_id"]).all()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.generate(ids, do_sample=True, temperature=0.0)
    with pytest.raises(TypeError, match="does not support forced_bos_token_id"):
        model.generate(ids, forced_bos_token_id=3)
    torch.manual_seed(4)
    theirs = _hf_generate(hf_model, ids, attention_mask=mask, do_sample=True, max_new_tokens=6, bad_words_ids=[[pad]])
    torch.manual_seed(4)
    assert model.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=6).tolist() == theirs.tolist()


def test_generate_equals_the_text_generation_pipeline(shared_data, tmp_path):
    path = tmp_path / "gpt2"
    bunmyaku.Tokenizer.from_pretrained(shared_data / "gpt2-tokenizer").save_pretrained(path)
    config = transformers.GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    torch.manual_seed(0)
    randomize(transformers.GPT2LMHeadModel(config), seed=0, scale=0.5).save_pretrained(path)
    pipe = bunmyaku.pipeline("text-generation", model=path, device="cpu")
    for prompt, settings in [("The meaning of life is", {}), ("Once upon a time", {"num_beams": 3})]:
        batch = pipe.tokenizer(prompt, return_tensors="pt")  # the HF habit: generate(**tokenizer(text))
        ids = batch["input_ids"]
        tokens = pipe.model.generate(**batch, max_new_tokens=12, **settings)
        text = pipe.tokenizer.decode(tokens[0, ids.size(1) :].tolist(), skip_special_tokens=True)
        new_only = pipe(prompt, max_new_tokens=12, return_full_text=False, **settings)[0]["generated_text"]
        assert new_only == text
        # HF's default, return_full_text=True: the prompt, then the same continuation
        assert pipe(prompt, max_new_tokens=12, **settings)[0]["generated_text"] == prompt + text
