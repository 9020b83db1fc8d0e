"""Llama: shapes, causality, KV cache, padding, attention paths, checkpoints, config checks, GGUF reading."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import bunmyaku
from bunmyaku.hub import CheckpointError
from bunmyaku.hub.gguf import hf_tensor_name, unpermute_rotary_rows
from bunmyaku.models.llama import TASKS, LlamaConfig, LlamaForCausalLM, LlamaModel
from tests.conftest import require_module

B, T, V = 3, 7, 99
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def tiny(**overrides) -> LlamaConfig:
    """Hidden 32, 2 layers, 4 query heads sharing 2 key/value heads, vocab 99."""
    fields = dict(
        vocab_size=V,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=37,
        max_seq_len=64,
        initializer_range=0.2,
        pad_token_id=0,
    )
    return LlamaConfig(**{**fields, **overrides})


def ids_and_left_padding(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture
def lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM.from_config(tiny()).eval()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_output_shapes(task):
    torch.manual_seed(0)
    model = TASKS[task].from_config(tiny().with_labels(5)).eval()
    ids, mask = ids_and_left_padding()
    out = model(input_ids=ids, attention_mask=mask)
    expected = {
        "base": {"last_hidden_state": (B, T, 32)},
        "causal-lm": {"logits": (B, T, V)},
        "sequence-classification": {"logits": (B, 5)},
        "token-classification": {"logits": (B, T, 5)},
        "question-answering": {"start_logits": (B, T), "end_logits": (B, T)},
    }[task]
    for field, shape in expected.items():
        assert tuple(out[field].shape) == shape


def test_no_causal_leakage(lm):
    ids, _ = ids_and_left_padding()
    changed = ids.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % V
    with torch.no_grad():
        a, b = lm(input_ids=ids).logits, lm(input_ids=changed).logits
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_step_decoding_equals_full_forward(lm, padded):
    ids, mask = ids_and_left_padding()
    mask = mask if padded else torch.ones_like(mask)
    with torch.no_grad():
        full = lm(input_ids=ids, attention_mask=mask).logits
        out = lm(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, T):
            out = lm(
                input_ids=ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            steps.append(out.logits)
    assert len(out.past_key_values) == T
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], atol=1e-5, rtol=1e-5)


def test_left_padding_invariance(lm):
    ids, mask = ids_and_left_padding()
    with torch.no_grad():
        batch = lm(input_ids=ids, attention_mask=mask).logits
        for row in range(B):
            real = mask[row].bool()
            alone = lm(input_ids=ids[row : row + 1, real]).logits[0]
            torch.testing.assert_close(batch[row, real], alone, atol=1e-5, rtol=1e-5)


def test_eager_equals_sdpa(lm):
    eager = LlamaForCausalLM(dataclasses.replace(lm.config, attn_implementation="eager")).eval()
    eager.load_state_dict(lm.state_dict())
    ids, mask = ids_and_left_padding()
    with torch.no_grad():
        a, b = lm(input_ids=ids, attention_mask=mask).logits, eager(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip(tmp_path, tied):
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_config(tiny(tie_word_embeddings=tied, rope_scaling=LLAMA3, attention_bias=True))
    model.save_pretrained(tmp_path)
    reloaded = bunmyaku.from_pretrained(tmp_path)
    assert isinstance(reloaded, LlamaForCausalLM)
    assert reloaded.config == dataclasses.replace(model.config, architectures=["LlamaForCausalLM"])
    assert (reloaded.head.lm_head.weight is reloaded.backbone.embed.weight) == tied
    saved = bunmyaku.hub.load_state_dict(tmp_path)
    assert ("lm_head.weight" in saved) != tied  # a tied copy is not written twice
    ids, mask = ids_and_left_padding()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids, attention_mask=mask).logits, model.eval()(input_ids=ids, attention_mask=mask).logits
        )


def test_mismatched_checkpoint_names_the_tensors(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM.from_config(tiny()).save_pretrained(tmp_path)
    state = bunmyaku.hub.load_state_dict(tmp_path)
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(4, 32)
    state["model.layers.0.self_attn.q_norm.weight"] = torch.zeros(8)
    with pytest.raises(CheckpointError) as err:
        LlamaForCausalLM(tiny()).load_hf_state_dict(state, source="broken")
    message = str(err.value)
    for name in ("layers.1.mlp.fc_in.weight", "model.layers.0.self_attn.k_proj.weight", "self_attn.q_norm.weight"):
        assert name in message


def test_config_reads_transformers_v5_rope_parameters():
    hf = tiny().to_hf() | {"rope_parameters": {"rope_theta": 500.0, **LLAMA3}}
    hf.pop("rope_theta")
    hf.pop("rope_scaling")
    config = LlamaConfig.from_hf(hf)
    assert config.rope_theta == 500.0 and config.rope_scaling == LLAMA3
    assert "rope_parameters" not in config.extra
    assert (
        LlamaConfig.from_hf({**hf, "rope_parameters": {"rope_theta": 7.0, "rope_type": "default"}}).rope_scaling is None
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"num_kv_heads": 3}, "num_kv_heads 3"),
        ({"hidden_size": 30}, "hidden_size 30"),
        ({"head_dim": 7}, "head_dim 7"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_head_dim_override_and_rope_frequencies():
    # theta 100, D 6: wavelengths 6.3, 29 and 135 positions; kept below 64 / 4, slowed by 8 above 64 / 1
    scaling = {**LLAMA3, "original_max_position_embeddings": 64}
    model = LlamaModel(tiny(head_dim=6, rope_theta=100.0, rope_scaling=scaling))
    assert model.layers[0].attn.q_proj.weight.shape == (4 * 6, 32)
    assert model.layers[0].attn.k_proj.weight.shape == (2 * 6, 32)
    plain = 1.0 / 100.0 ** (torch.arange(0, 6, 2).float() / 6)
    fast, middle, slow = model.rotary.inv_freq.tolist()
    assert fast == pytest.approx(plain[0].item()) and slow == pytest.approx(plain[2].item() / 8)
    assert plain[1].item() / 8 < middle < plain[1].item()
    assert model.to(torch.bfloat16).rotary.inv_freq.dtype == torch.float32  # RoPE angles stay exact in bf16


# ---------------------------------------------------------------------------------------------------- GGUF


def llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to Q and K rows: interleave each head's two halves (i, i + D/2)."""
    D = weight.size(0) // num_heads
    return weight.reshape(num_heads, 2, D // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def test_unpermute_rotary_rows_inverts_llama_cpp():
    w = torch.randn(3 * 8, 5)
    torch.testing.assert_close(unpermute_rotary_rows(llama_cpp_permute(w, 3), 3), w)
    bias = torch.arange(2 * 4.0)
    assert unpermute_rotary_rows(llama_cpp_permute(bias, 2), 2).tolist() == bias.tolist()
    # within a head the stored order is (0, D/2, 1, D/2 + 1, ...)
    assert llama_cpp_permute(torch.arange(8.0), 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


# llama.cpp's tensor names (its gguf-py TENSOR_NAMES for LLM_ARCH_LLAMA) and HF Llama's, written out here rather
# than taken from bunmyaku's table, so that a swapped pair in that table cannot round-trip through write_gguf.
LLAMA_CPP_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LLAMA_CPP_LAYER_TO_HF = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def llama_cpp_names(config: LlamaConfig) -> dict[str, str]:
    """llama.cpp name -> HF name of every tensor of a Llama model without biases."""
    names = dict(LLAMA_CPP_TO_HF)
    if config.tie_word_embeddings:
        del names["output.weight"]  # llama.cpp stores no output matrix for tied embeddings
    for i in range(config.num_layers):
        for cpp, hf in LLAMA_CPP_LAYER_TO_HF.items():
            names[f"blk.{i}.{cpp}"] = f"model.layers.{i}.{hf}"
    return names


def test_gguf_tensor_names():
    for gguf_name, hf_name in llama_cpp_names(tiny(num_layers=13)).items():
        assert hf_tensor_name(gguf_name) == hf_name, gguf_name
    with pytest.raises(KeyError):
        hf_tensor_name("blk.0.attn_q_norm.weight")


def write_gguf(path, model: LlamaForCausalLM, quantize_embeddings: bool = False, tokenizer=None) -> None:
    """A GGUF file as llama.cpp's converter writes one: its metadata, its names, Q and K rows permuted.

    ``tokenizer(writer)``, when given, adds the tokenizer's metadata (it then sets the special token ids)."""
    gguf = require_module("gguf")
    c = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(c.num_layers)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if tokenizer is not None:
        tokenizer(writer)
    else:
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    hf_state = model.hf_state_dict()
    for gguf_name, hf_name in llama_cpp_names(c).items():
        tensor = hf_state[hf_name]
        if ".attn_q." in gguf_name:
            tensor = llama_cpp_permute(tensor, c.num_heads)
        elif ".attn_k." in gguf_name:
            tensor = llama_cpp_permute(tensor, c.num_kv_heads)
        array = tensor.numpy()
        if quantize_embeddings and gguf_name == "token_embd.weight":
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, q8), raw_dtype=q8)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tied", [False, True])
def test_from_gguf_equals_the_model_written(tmp_path, tied):
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_config(
        tiny(num_heads=8, num_kv_heads=2, tie_word_embeddings=tied, rope_theta=5000.0, pad_token_id=None)
    ).eval()
    write_gguf(tmp_path / "tiny.gguf", model)
    loaded = bunmyaku.from_pretrained(tmp_path / "tiny.gguf")
    assert isinstance(loaded, LlamaForCausalLM) and not loaded.training
    assert loaded.config.tie_word_embeddings == tied and loaded.config.rope_theta == 5000.0
    assert (loaded.config.num_heads, loaded.config.num_kv_heads, loaded.config.eos_token_id) == (8, 2, 2)
    ids, mask = ids_and_left_padding()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits
        )
    base = bunmyaku.from_pretrained(tmp_path, task="base")  # a folder holding one .gguf file
    assert isinstance(base, LlamaModel)


@pytest.mark.parametrize("tied", [False, True])
def test_from_gguf_equals_transformers_gguf_loader(tmp_path, tied):
    """The same file read by transformers' own GGUF loader (its names, its un-permutation of Q and K rows)."""
    transformers = require_module("transformers")
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_config(tiny(num_heads=8, num_kv_heads=2, tie_word_embeddings=tied)).eval()
    write_gguf(tmp_path / "tiny.gguf", model)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    ours = bunmyaku.from_pretrained(tmp_path / "tiny.gguf")
    ids, _ = ids_and_left_padding()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, expected)
    assert not torch.allclose(expected, LlamaForCausalLM.from_config(model.config)(input_ids=ids).logits)


def test_from_gguf_dequantizes(tmp_path):
    gguf = require_module("gguf")
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_config(tiny()).eval()
    write_gguf(tmp_path / "q8.gguf", model, quantize_embeddings=True)
    loaded = bunmyaku.from_pretrained(tmp_path / "q8.gguf", dtype="bfloat16")
    assert loaded.backbone.embed.weight.dtype == torch.bfloat16
    embed = model.backbone.embed.weight.detach().numpy()
    q8 = gguf.GGMLQuantizationType.Q8_0
    expected = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(embed, q8), q8))
    torch.testing.assert_close(loaded.backbone.embed.weight.float(), expected.to(torch.bfloat16).float())
    assert (expected - model.backbone.embed.weight).abs().max() > 0  # it was quantized, and read back as such


def test_from_gguf_errors(tmp_path):
    require_module("gguf")
    with pytest.raises(FileNotFoundError):
        bunmyaku.models.llama.from_gguf(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="junk.gguf"):
        bunmyaku.models.llama.from_gguf(tmp_path / "junk.gguf")
    with pytest.raises(ValueError, match="masked-lm"):
        bunmyaku.models.llama.from_gguf(tmp_path / "junk.gguf", task="masked-lm")


def test_from_gguf_takes_a_head_and_config_overrides(tmp_path):
    """The loader shared with from_pretrained: num_labels and config fields apply to a GGUF file too."""
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_config(tiny()).eval()
    write_gguf(tmp_path / "tiny.gguf", model)
    classifier = bunmyaku.from_pretrained(
        tmp_path / "tiny.gguf", task="sequence-classification", num_labels=3, attn_implementation="eager"
    )
    assert classifier.config.num_labels == 3 and classifier.config.attn_implementation == "eager"
    ids = torch.randint(1, V, (1, T))
    with torch.no_grad():
        assert classifier(input_ids=ids).logits.shape == (1, 3)
        torch.testing.assert_close(
            classifier.backbone(input_ids=ids).last_hidden_state, model.backbone(input_ids=ids).last_hidden_state
        )
