"""GPT-2 parity with ``transformers``: every head, three tiny configs, left padding, both directions."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import bunmyaku
from bunmyaku.models.attention import eager_attention
from bunmyaku.models.gpt2 import GPT2Config, upcast_reordered_attention
from tests.conftest import require_module
from tests.parity.helpers import assert_close, randomize, right_padded_batch, save

transformers = require_module("transformers")

PAD = 0  # pad_token_id; real ids are drawn from [3, vocab)
SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
CONFIGS = [
    dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=24),
    dict(vocab_size=101, n_embd=36, n_layer=3, n_head=3, n_inner=50, n_positions=20, activation_function="relu",
         scale_attn_by_inverse_layer_idx=True, layer_norm_epsilon=1e-6, summary_activation="tanh"),
    dict(vocab_size=77, n_embd=24, n_layer=1, n_head=6, n_inner=31, n_positions=16,
         activation_function="gelu_pytorch_tanh", scale_attn_weights=False, reorder_and_upcast_attn=True,
         summary_proj_to_labels=False),
]  # fmt: skip

# summary_type stays cls_index (GPT-2's): HF's "first" / "last" / "mean" index the choice axis of (B, N, T, C)
# states, where ours read each choice's own tokens.

# task -> (HF class name, output fields to compare, extra config)
HEADS = {
    "base": ("GPT2Model", ["last_hidden_state"], {}),
    "causal-lm": ("GPT2LMHeadModel", ["logits"], {}),
    "sequence-classification": ("GPT2ForSequenceClassification", ["logits"], {"num_labels": 3}),
    "token-classification": ("GPT2ForTokenClassification", ["logits"], {"num_labels": 5}),
    "question-answering": ("GPT2ForQuestionAnswering", ["start_logits", "end_logits"], {}),
    "pair-classification": ("GPT2DoubleHeadsModel", ["logits", "mc_logits"], {}),
}


def _hf_config(index: int, **extra) -> transformers.GPT2Config:
    return transformers.GPT2Config(**CONFIGS[index], **SPECIAL, **extra)


def _batch(index: int, task: str, seed: int, padding: str = "left"):
    """Our inputs, HF's inputs (with explicit positions: HF does not derive them from the mask), the real positions."""
    rows = 6 if task == "pair-classification" else 3
    ids, mask = right_padded_batch(CONFIGS[index]["vocab_size"], batch=rows, seed=seed)  # rows of 9, 6, 4, 2, ...
    mask = mask.flip(-1) if padding == "left" else mask
    ids = ids.masked_fill(mask == 0, PAD)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ours = dict(input_ids=ids, attention_mask=mask)
    theirs = dict(input_ids=ids, attention_mask=mask, position_ids=positions)
    if task == "pair-classification":  # (B, N, T): 2 examples x 3 choices; HF takes positions flattened
        last_real = positions.argmax(-1) - torch.arange(rows) % 2  # the last real token, or the one before
        ours = dict(input_ids=ids.view(2, 3, -1), attention_mask=mask.view(2, 3, -1), mc_token_ids=last_real.view(2, 3))
        theirs = dict(ours, position_ids=positions)
        mask = mask.view(2, 3, -1)
    return ours, theirs, mask


def _compare(ours, theirs, fields, mask):
    for field in fields:
        a, b = ours[field], getattr(theirs, field)
        assert_close(a, b, mask if a.shape[: mask.dim()] == mask.shape else None)


@pytest.mark.parametrize("task", list(HEADS))
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_gpt2_parity_both_directions(tmp_path, task, index):
    hf_name, fields, extra = HEADS[task]
    hf_model = randomize(getattr(transformers, hf_name)(_hf_config(index, **extra)), seed=index)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"), task=task)
    assert type(model).task == task
    paddings = ["left", "right"] if task == "sequence-classification" else ["left"]
    for padding in paddings:
        ours, theirs, mask = _batch(index, task, seed=index, padding=padding)
        with torch.no_grad():
            expected = hf_model(**theirs)
            _compare(model(**ours), expected, fields, mask)
            # and back: bunmyaku saves, transformers loads
            reloaded = getattr(transformers, hf_name).from_pretrained(save(model, tmp_path / "ours")).eval()
            _compare(reloaded(**theirs), expected, fields, mask)


def test_gpt2_hidden_states_match(tmp_path):
    hf_model = randomize(transformers.GPT2Model(_hf_config(1)), seed=4)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    ours, theirs, mask = _batch(1, "base", seed=4)
    with torch.no_grad():
        expected = hf_model(**theirs, output_hidden_states=True).hidden_states
        actual = model(**ours, output_hidden_states=True).hidden_states
    assert len(actual) == len(expected) == CONFIGS[1]["n_layer"] + 1
    for a, b in zip(actual, expected, strict=True):
        assert_close(a, b, mask)


# Losses read padding positions too (the shifted LM loss scores the last padding position's logits against the
# first real token, QA normalises over all T), whose values are each implementation's own: right padding there.


def test_gpt2_losses_match(tmp_path):
    ours, theirs, mask = _batch(0, "causal-lm", seed=1, padding="right")
    labels = ours["input_ids"].masked_fill(mask == 0, -100)
    cases = [
        ("GPT2LMHeadModel", "causal-lm", {}, {"labels": labels}),
        ("GPT2ForSequenceClassification", "sequence-classification", {"num_labels": 3},
         {"labels": torch.tensor([0, 2, 1])}),
        ("GPT2ForTokenClassification", "token-classification", {"num_labels": 5},
         {"labels": torch.randint(0, 5, labels.shape).masked_fill(mask == 0, -100)}),
        ("GPT2ForQuestionAnswering", "question-answering", {},
         {"start_positions": torch.tensor([1, 3, 20]), "end_positions": torch.tensor([2, 5, 20])}),
    ]  # fmt: skip
    for hf_name, task, extra, labels_kw in cases:
        hf_model = randomize(getattr(transformers, hf_name)(_hf_config(0, **extra)), seed=3)
        model = bunmyaku.from_pretrained(save(hf_model, tmp_path / hf_name), task=task)
        with torch.no_grad():
            assert_close(model(**ours, **labels_kw).loss, hf_model(**theirs, **labels_kw).loss)


def test_gpt2_double_heads_losses_match(tmp_path):
    hf_model = randomize(transformers.GPT2DoubleHeadsModel(_hf_config(1)), seed=6)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"), task="pair-classification")
    ours, theirs, mask = _batch(1, "pair-classification", seed=2, padding="right")
    labels = dict(labels=ours["input_ids"].masked_fill(mask == 0, -100), mc_labels=torch.tensor([2, 0]))
    with torch.no_grad():
        actual, expected = model(**ours, **labels), hf_model(**theirs, **labels)
    assert_close(actual.loss, expected.loss)
    assert_close(actual.mc_loss, expected.mc_loss)


@pytest.mark.parametrize("problem_type", ["regression", "multi_label_classification"])
def test_gpt2_sequence_problem_types(tmp_path, problem_type):
    num_labels = 1 if problem_type == "regression" else 4
    config = _hf_config(2, num_labels=num_labels, problem_type=problem_type)
    hf_model = randomize(transformers.GPT2ForSequenceClassification(config), seed=5)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    ours, theirs, _ = _batch(2, "sequence-classification", seed=2, padding="right")
    labels = torch.rand(3) * 5 if num_labels == 1 else (torch.rand(3, 4) > 0.5).float()
    with torch.no_grad():
        assert_close(model(**ours, labels=labels).loss, hf_model(**theirs, labels=labels).loss)


def test_gpt2_sequence_classification_without_pad_token(tmp_path):
    """No pad_token_id: HF refuses a batch of several rows and reads one row at its last position, padded or not."""
    config = transformers.GPT2Config(**CONFIGS[0], bos_token_id=1, eos_token_id=2, num_labels=2)
    hf_model = randomize(transformers.GPT2ForSequenceClassification(config), seed=8)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    ours, theirs, _ = _batch(0, "sequence-classification", seed=8, padding="right")
    with pytest.raises(ValueError, match="batch sizes > 1"), torch.no_grad():
        hf_model(**theirs)
    with pytest.raises(ValueError, match="pad_token_id"), torch.no_grad():
        model(**ours)
    row = {k: v[2:] for k, v in ours.items()}  # one right-padded row
    assert row["attention_mask"][0, -1] == 0
    with torch.no_grad():
        assert_close(model(**row).logits, hf_model(**{k: v[2:] for k, v in theirs.items()}).logits)


def test_gpt2_untied_lm_head(tmp_path):
    hf_model = randomize(transformers.GPT2LMHeadModel(_hf_config(0, tie_word_embeddings=False)), seed=7)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"), task="causal-lm")
    assert model.head.lm_head.weight.data_ptr() != model.backbone.embed.tokens.weight.data_ptr()
    ours, theirs, mask = _batch(0, "causal-lm", seed=7)
    with torch.no_grad():
        expected = hf_model(**theirs)
        assert_close(model(**ours).logits, expected.logits, mask)
        assert "lm_head.weight" in load_file(save(model, tmp_path / "ours") / "model.safetensors")
        reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
        assert_close(reloaded(**theirs).logits, expected.logits, mask)


def test_gpt2_bare_base_checkpoint_with_old_buffers(tmp_path):
    """OpenAI's checkpoints: base-model names (no ``transformer.``) and the causal mask saved as ``attn.bias``."""
    hf_model = randomize(transformers.GPT2Model(_hf_config(0)), seed=8)
    folder = save(hf_model, tmp_path / "hf")
    state = load_file(folder / "model.safetensors")
    T = CONFIGS[0]["n_positions"]
    for i in range(CONFIGS[0]["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.ones(T, T).tril()[None, None]
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, folder / "model.safetensors")
    model = bunmyaku.from_pretrained(folder, task="causal-lm")
    hf_lm = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    ours, theirs, mask = _batch(0, "causal-lm", seed=8)
    with torch.no_grad():
        assert_close(model(**ours).logits, hf_lm(**theirs).logits, mask)


def test_gpt2_config_round_trips(tmp_path):
    folder = save(transformers.GPT2DoubleHeadsModel(_hf_config(1, use_cache=False)), tmp_path / "hf")
    original = json.loads((folder / "config.json").read_text())
    config = GPT2Config.from_hf(original)
    assert (config.hidden_size, config.num_layers, config.intermediate_size) == (36, 3, 50)
    assert config.extra == {"use_cache": False}
    written = config.to_hf()
    for key in ("transformers_version", "dtype"):
        original.pop(key)
    assert written == original
    default_width = GPT2Config.from_hf(json.loads((save(transformers.GPT2Model(_hf_config(0)), tmp_path / "b")
                                                   / "config.json").read_text()))  # fmt: skip
    assert default_width.intermediate_size == 4 * 32 and default_width.to_hf()["n_inner"] is None


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_matches_transformers(tmp_path, num_beams):
    from bunmyaku.models.generation import generate

    config = transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    hf_model = randomize(transformers.GPT2LMHeadModel(config), seed=7, scale=0.3)
    ours = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    ids = torch.randint(3, 61, (2, 6), generator=torch.Generator().manual_seed(1))
    # an end token the model actually produces, so beams finish at different steps
    eos = int(hf_model(ids).logits[0, -1].argsort()[-3])
    with torch.no_grad():
        expected = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            num_beams=num_beams,
            do_sample=False,
            max_new_tokens=12,
            eos_token_id=eos,
            pad_token_id=0,
            length_penalty=0.8,
        )
    got = generate(
        ours, ids, num_beams=num_beams, max_new_tokens=12, eos_token_id=eos, pad_token_id=0, length_penalty=0.8
    )

    def until_eos(row):  # transformers 5 fills a finished beam with EOS, we with the pad id: compare up to EOS
        row = row[ids.size(1) :]
        return row[: row.index(eos) + 1] if eos in row else row

    assert [until_eos(r) for r in got.tolist()] == [until_eos(r) for r in expected.tolist()]
    assert any(eos in r for r in got.tolist())  # a beam did finish early, so the finishing rules were exercised


def test_upcast_reordered_attention_equals_transformers():
    """reorder_and_upcast_attn's attention against GPT2Attention._upcast_and_reordered_attn, on bf16 inputs."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    config = transformers.GPT2Config(
        n_embd=32, n_head=4, reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True
    )
    attention = GPT2Attention(config, layer_idx=2).eval()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=gen).mul(8).to(torch.bfloat16) for _ in range(3))  # large scores
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()[None, None] & torch.tensor([1, 1, 1, 1, 1, 0, 0]).bool()
    additive = torch.zeros(allowed.shape, dtype=torch.bfloat16).masked_fill(~allowed, torch.finfo(torch.bfloat16).min)
    expected, _ = attention._upcast_and_reordered_attn(q, k, v, additive)  # (B, T, H, D)
    actual = upcast_reordered_attention(q, k, v, mask=allowed, scale=attention.scaling)  # (B, H, T, D)
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.transpose(1, 2), expected, atol=0, rtol=0)
    plain = eager_attention(q, k, v, mask=allowed, scale=attention.scaling)  # scores in bf16: not the same numbers
    assert not torch.equal(plain.transpose(1, 2), expected)


def test_reorder_and_upcast_attn_matches_transformers_in_bf16(tmp_path):
    """transformers honours the option on its eager path: the scores and their softmax in fp32 under bf16 weights."""
    config = _hf_config(0, reorder_and_upcast_attn=True)
    config._attn_implementation = "eager"
    hf_model = randomize(transformers.GPT2LMHeadModel(config), seed=9, scale=0.5)  # scale 0.5: large scores
    folder = save(hf_model, tmp_path / "hf")
    ours, theirs, mask = _batch(0, "causal-lm", seed=9, padding="right")
    with torch.no_grad():
        expected = hf_model.to(torch.bfloat16)(**theirs).logits
        logits = {}
        for upcast in (True, False):
            model = bunmyaku.from_pretrained(
                folder, dtype="bfloat16", attn_implementation="eager", reorder_and_upcast_attn=upcast
            )
            logits[upcast] = model(**ours).logits
    effect = (logits[False].float() - expected.float())[mask.bool()].abs().max().item()
    assert effect > 0.05  # what the option changes here, in bf16
    assert_close(logits[True], expected, mask, atol=effect / 10)


def test_resize_token_embeddings_as_transformers(tmp_path):
    """Three added ids: their rows, the tied LM head and the logits as transformers' resize_token_embeddings."""
    hf_model = randomize(transformers.GPT2LMHeadModel(_hf_config(0)), seed=10)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"), task="causal-lm")
    torch.manual_seed(0)  # transformers samples the new rows around the old rows' mean (covariance 1e-9 x theirs)
    hf_model.resize_token_embeddings(102)
    tokens = model.resize_token_embeddings(102)
    assert tokens is model.backbone.embed.tokens and tokens.weight.shape == (102, 32)
    assert model.config.vocab_size == 102 and model.head.lm_head.weight is tokens.weight  # still tied
    assert_close(tokens.weight, hf_model.transformer.wte.weight, atol=1e-4)
    ids = torch.tensor([[5, 99, 100, 7, 101]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert logits.shape == (1, 5, 102)
        assert_close(logits, hf_model(input_ids=ids).logits, atol=1e-4)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(save(model, tmp_path / "ours"))
    assert reloaded.config.vocab_size == 102
