"""Transformer (MarianMT) parity with ``transformers``: both heads, three tiny configs, both directions, generation."""

from __future__ import annotations

import pytest
import torch

import bunmyaku
from tests.conftest import require_module
from tests.parity.helpers import assert_close, randomize, right_padded_batch, save

transformers = require_module("transformers")
from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding  # noqa: E402

CONFIGS = [
    dict(
        vocab_size=99,
        d_model=32,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=2,
        encoder_ffn_dim=37,
        decoder_ffn_dim=29,
        activation_function="swish",
        scale_embedding=True,
        max_position_embeddings=64,
        pad_token_id=98,
        decoder_start_token_id=98,
        eos_token_id=0,
    ),
    # odd width, separate source and target vocabularies, the output layer tied to the target one
    dict(
        vocab_size=101,
        decoder_vocab_size=73,
        d_model=33,
        encoder_layers=1,
        decoder_layers=3,
        encoder_attention_heads=3,
        decoder_attention_heads=11,
        encoder_ffn_dim=41,
        decoder_ffn_dim=23,
        activation_function="gelu",
        scale_embedding=False,
        share_encoder_decoder_embeddings=False,
        max_position_embeddings=40,
        pad_token_id=72,
        decoder_start_token_id=72,
        eos_token_id=1,
    ),
    # three separate matrices: source, target, output layer
    dict(
        vocab_size=77,
        d_model=24,
        encoder_layers=3,
        decoder_layers=2,
        encoder_attention_heads=6,
        decoder_attention_heads=4,
        encoder_ffn_dim=31,
        decoder_ffn_dim=50,
        activation_function="relu",
        scale_embedding=True,
        share_encoder_decoder_embeddings=False,
        tie_word_embeddings=False,
        max_position_embeddings=32,
        pad_token_id=76,
        decoder_start_token_id=76,
        eos_token_id=2,
    ),
]

# task -> (HF class, output fields to compare: (name, which mask applies))
HEADS = {
    "base": ("MarianModel", [("last_hidden_state", "target"), ("encoder_last_hidden_state", "source")]),
    "seq2seq-lm": ("MarianMTModel", [("logits", "target"), ("encoder_last_hidden_state", "source")]),
}


def _hf_model(hf_name: str, index: int, folder, seed: int = 0):
    """A random HF model (fixed sinusoids left intact), saved and reloaded from its folder."""
    # forced_eos_token_id=None: MarianConfig forces the end token at max_length by default; bunmyaku's generate does not
    config = transformers.MarianConfig(**CONFIGS[index], forced_eos_token_id=None)
    model = randomize(getattr(transformers, hf_name)(config), seed=seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MarianSinusoidalPositionalEmbedding):
                module.weight.copy_(module.create_weight())
        if hf_name == "MarianMTModel":
            model.final_logits_bias.normal_(generator=torch.Generator().manual_seed(seed))
    save(model, folder)
    return getattr(transformers, hf_name).from_pretrained(folder).eval(), folder


def _inputs(index: int, seed: int):
    config = CONFIGS[index]
    ids, mask = right_padded_batch(config["vocab_size"], seed=seed)
    target_ids, target_mask = right_padded_batch(
        config.get("decoder_vocab_size", config["vocab_size"]), length=6, seed=seed + 1
    )
    target_ids[:, 0] = config["decoder_start_token_id"]
    inputs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=target_ids, decoder_attention_mask=target_mask)
    return inputs, {"source": mask, "target": target_mask}


def _compare(ours, theirs, fields, masks):
    for field, which in fields:
        assert_close(ours[field], getattr(theirs, field), masks[which])


@pytest.mark.parametrize("task", list(HEADS))
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_marian_parity_both_directions(tmp_path, task, index):
    hf_name, fields = HEADS[task]
    hf_model, folder = _hf_model(hf_name, index, tmp_path / "hf", seed=index)
    model = bunmyaku.from_pretrained(folder)  # the head comes from the checkpoint's architectures
    assert type(model).task == task
    inputs, masks = _inputs(index, seed=index)
    with torch.no_grad():
        expected = hf_model(**inputs)
        _compare(model(**inputs), expected, fields, masks)
        # and back: bunmyaku saves, transformers loads
        reloaded = getattr(transformers, hf_name).from_pretrained(save(model, tmp_path / "ours")).eval()
        _compare(reloaded(**inputs), expected, fields, masks)


def test_marian_translation_checkpoint_loads_as_base_model(tmp_path):
    hf_model, folder = _hf_model("MarianMTModel", 1, tmp_path / "hf")
    model = bunmyaku.from_pretrained(folder, task="base")
    inputs, masks = _inputs(1, seed=3)
    with torch.no_grad():
        _compare(model(**inputs), hf_model.model(**inputs), HEADS["base"][1], masks)


def test_marian_old_checkpoint_with_positions_and_tied_copies(tmp_path):
    """transformers 4.x ``.bin`` conversions store every tensor, sinusoids and tied copies included."""
    from safetensors.torch import save_file

    hf_model, folder = _hf_model("MarianMTModel", 0, tmp_path / "hf")
    full = {k: v.detach().clone().contiguous() for k, v in hf_model.state_dict().items()}
    assert "model.encoder.embed_positions.weight" in full and "lm_head.weight" in full
    save_file(full, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model = bunmyaku.from_pretrained(folder)
    inputs, masks = _inputs(0, seed=4)
    with torch.no_grad():
        _compare(model(**inputs), hf_model(**inputs), HEADS["seq2seq-lm"][1], masks)


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_marian_loss_with_shifted_labels(tmp_path, index):
    hf_model, folder = _hf_model("MarianMTModel", index, tmp_path / "hf", seed=10 + index)
    model = bunmyaku.from_pretrained(folder)
    inputs, masks = _inputs(index, seed=5)
    labels = inputs["decoder_input_ids"].roll(-1, dims=1).masked_fill(masks["target"] == 0, -100)
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels)
    with torch.no_grad():
        ours, theirs = model(**kwargs), hf_model(**kwargs)  # decoder_input_ids: labels shifted right
    assert_close(ours.loss, theirs.loss)
    assert_close(ours.logits, theirs.logits)


@pytest.mark.parametrize(
    "num_beams, length_penalty, two_end_tokens", [(1, 1.0, False), (3, 1.0, False), (4, 0.5, True)]
)
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_marian_generate_matches_transformers(tmp_path, index, num_beams, length_penalty, two_end_tokens):
    hf_model, folder = _hf_model("MarianMTModel", index, tmp_path / "hf", seed=20 + index)
    model = bunmyaku.from_pretrained(folder)
    inputs, _ = _inputs(index, seed=6)
    source = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    pad = CONFIGS[index]["pad_token_id"]
    with torch.no_grad():
        # tokens the random model does produce end sentences, so finished beams and padding are exercised
        probe = hf_model.generate(**source, max_new_tokens=4, bad_words_ids=[[pad]])
        eos = [int(probe[-1, 3]), int(probe[0, 2])] if two_end_tokens else int(probe[-1, 3])
        settings = dict(max_new_tokens=7, num_beams=num_beams, length_penalty=length_penalty, eos_token_id=eos)
        expected = hf_model.generate(**source, **settings, bad_words_ids=[[pad]], do_sample=False, early_stopping=False)
        actual = model.generate(**source, **settings)
    assert actual.tolist() == expected.tolist()
