"""generate(): greedy against full forwards, batching with left padding, sampling, EOS, repetition penalty."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bunmyaku
from bunmyaku.models.base import ModelOutput
from bunmyaku.models.generation import generate, penalize_repeats, top_k_filter, top_p_filter
from bunmyaku.models.llama import LlamaConfig, LlamaForCausalLM
from tests.conftest import require_module
from tests.parity.helpers import randomize

V = 61


@pytest.fixture(scope="module")
def lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=48,
        max_seq_len=128,
        initializer_range=0.3,
    )
    return LlamaForCausalLM.from_config(config).eval()


def prompts():
    """Three prompts of lengths 6, 3 and 1, left-padded with id 0."""
    ids = torch.tensor([[5, 9, 13, 2, 40, 7], [0, 0, 0, 33, 21, 8], [0, 0, 0, 0, 0, 17]])
    return ids, (torch.arange(6) >= torch.tensor([[0], [3], [5]])).long()


class FixedLogits(nn.Module):
    """A stand-in decoder with the generation contract that predicts the same logits at every step."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache):
        assert position_ids.shape == input_ids.shape and attention_mask.size(1) >= input_ids.size(1)
        B, T = input_ids.shape
        return ModelOutput(logits=self.logits.expand(B, T, -1), past_key_values=past_key_values)


def test_greedy_equals_argmax_of_full_forward(lm):
    ids = torch.tensor([[3, 14, 15, 9, 26]])
    out = generate(lm, ids, max_new_tokens=10)
    assert out.shape == (1, 15) and torch.equal(out[:, :5], ids)
    with torch.no_grad():
        for t in range(5, 15):
            assert out[0, t] == lm(input_ids=out[:, :t]).logits[0, -1].argmax()


def test_left_padded_batch_equals_rows_alone(lm):
    ids, mask = prompts()
    batch = generate(lm, ids, mask, max_new_tokens=8)
    for row in range(3):
        alone = generate(lm, ids[row : row + 1, mask[row].bool()], max_new_tokens=8)
        assert torch.equal(batch[row, 6:], alone[0, -8:])


def test_sampling_is_reproducible_with_a_seed(lm):
    ids, mask = prompts()
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=1.5)
    first = generate(lm, ids, mask, seed=7, **kwargs)
    assert torch.equal(first, generate(lm, ids, mask, seed=7, **kwargs))
    assert not torch.equal(first, generate(lm, ids, mask, seed=8, **kwargs))


def test_top_k_1_equals_greedy(lm):
    ids, mask = prompts()
    sampled = generate(lm, ids, mask, max_new_tokens=8, do_sample=True, top_k=1, temperature=2.0, seed=0)
    assert torch.equal(sampled, generate(lm, ids, mask, max_new_tokens=8))


def test_eos_stops_a_row_and_pads_it(lm):
    ids, mask = prompts()
    free = generate(lm, ids, mask, max_new_tokens=8)
    eos = int(free[0, 6 + 2])  # row 0's third new token
    first_eos = [(row[6:] == eos).nonzero()[0].item() if (row[6:] == eos).any() else None for row in free]
    stopped = generate(lm, ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=V - 1)
    for row, at in enumerate(first_eos):
        if at is None:
            assert torch.equal(stopped[row, 6:], free[row, 6 : stopped.size(1)])
        else:
            assert torch.equal(stopped[row, : 6 + at + 1], free[row, : 6 + at + 1])
            assert (stopped[row, 6 + at + 1 :] == V - 1).all()


def test_generation_stops_when_every_row_has_finished():
    eos_always = FixedLogits([0.0, 5.0, 1.0])
    calls = []
    out = generate(
        eos_always,
        torch.tensor([[2, 2], [0, 2]]),
        torch.tensor([[1, 1], [0, 1]]),
        max_new_tokens=5,
        eos_token_id=[1],
        streamer=calls.append,
    )
    assert out.tolist() == [[2, 2, 1], [0, 2, 1]]
    assert len(calls) == 1 and calls[0].tolist() == [1, 1]


def test_stop_callback_finishes_rows(lm):
    ids, mask = prompts()
    free = generate(lm, ids, mask, max_new_tokens=8)
    seen_lengths = []

    def row_1_after_two_new_tokens(tokens):
        seen_lengths.append(tokens.size(1))
        return torch.tensor([False, tokens.size(1) >= 6 + 2, False])

    out = generate(lm, ids, mask, max_new_tokens=8, pad_token_id=V - 1, stop=row_1_after_two_new_tokens)
    assert seen_lengths == list(range(7, 15))
    assert torch.equal(out[[0, 2]], free[[0, 2]])
    assert torch.equal(out[1, :8], free[1, :8]) and (out[1, 8:] == V - 1).all()


def test_streamer_sees_every_new_token(lm):
    ids, mask = prompts()
    seen = []
    out = generate(lm, ids, mask, max_new_tokens=5, streamer=seen.append)
    assert torch.equal(torch.stack(seen, dim=1), out[:, 6:])


@pytest.mark.parametrize("logits", [[0.0, 2.0, 1.5, 0.0], [-9.0, -1.0, -1.5, -9.0]])
def test_repetition_penalty_moves_away_from_seen_tokens(logits):
    """Token 1 leads token 2 by 0.5 and is in the prompt; a penalty of 2 makes it trail, whatever the sign."""
    model = FixedLogits(logits)
    prompt = torch.tensor([[3, 1]])
    assert generate(model, prompt, max_new_tokens=1)[0, -1] == 1
    assert generate(model, prompt, max_new_tokens=1, repetition_penalty=2.0)[0, -1] == 2
    # padding is not a seen token
    padded = generate(model, torch.tensor([[1, 3]]), torch.tensor([[0, 1]]), max_new_tokens=1, repetition_penalty=2.0)
    assert padded[0, -1] == 1


def test_logit_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert penalize_repeats(logits, torch.tensor([[1, 1, 3]]), torch.ones(1, 3), 2.0).tolist() == [[1.0, 1.5, 2.0, 0.0]]
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[True, False, False, True]]
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1]]).log()
    assert torch.isinf(top_p_filter(probs, 0.75)).tolist() == [[True, False, False, True]]
    assert torch.isinf(top_p_filter(probs, 0.45)).tolist() == [[True, False, True, True]]
    assert not torch.isinf(top_p_filter(probs, 1.0)).any()


def test_bad_arguments_raise(lm):
    ids = torch.tensor([[1, 2]])
    assert torch.equal(generate(lm, ids, max_new_tokens=0), ids)
    bad = {
        "temperature": dict(do_sample=True, temperature=0.0),
        "top_k": dict(top_k=0),
        "top_p": dict(top_p=1.5),
        "repetition_penalty": dict(repetition_penalty=0),
        "num_beams": dict(num_beams=0),  # once ran greedy search without a word
        "max_new_tokens": dict(max_new_tokens=-1),
    }
    for name, kwargs in bad.items():
        with pytest.raises(ValueError, match=name):
            generate(lm, ids, **kwargs)


@pytest.mark.parametrize(("num_beams", "length_penalty"), [(2, 1.0), (3, 0.5), (4, 2.0)])
def test_llama_beam_search_matches_transformers(tmp_path, num_beams, length_penalty):
    """Beam search on a random Llama gives transformers' tokens (its default early_stopping=False rules), a
    left-padded row included, and differs from greedy search: the option does what it says."""
    transformers = require_module("transformers")
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    hf_model = randomize(transformers.LlamaForCausalLM(config), seed=3, scale=0.4).eval()
    hf_model.save_pretrained(tmp_path)
    ours = bunmyaku.from_pretrained(tmp_path)
    ids = torch.randint(3, V, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # a shorter prompt, left-padded
    with torch.no_grad():
        eos = int(hf_model(ids[:1]).logits[0, -1].argsort()[-3])  # an end token the model does produce
        expected = hf_model.generate(
            ids,
            attention_mask=mask,
            num_beams=num_beams,
            do_sample=False,
            max_new_tokens=10,
            eos_token_id=eos,
            pad_token_id=0,
            length_penalty=length_penalty,
            early_stopping=False,
        )
    settings = dict(max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    got = generate(ours, ids, mask, num_beams=num_beams, length_penalty=length_penalty, **settings)

    def until_eos(row):  # transformers fills a finished row with EOS, we with the pad id: compare up to EOS
        row = row[ids.size(1) :]
        return row[: row.index(eos) + 1] if eos in row else row

    assert [until_eos(r) for r in got.tolist()] == [until_eos(r) for r in expected.tolist()]
    greedy = generate(ours, ids, mask, **settings)
    assert [until_eos(r) for r in greedy.tolist()] != [until_eos(r) for r in got.tolist()]
