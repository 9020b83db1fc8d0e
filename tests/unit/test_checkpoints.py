"""HF-format load / save: formats, sharding, atomic writes and the errors users see."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import bunmyaku
from bunmyaku.hub import CheckpointError, KeyMap, load_state_dict
from bunmyaku.models.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

TINY = dict(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, max_seq_len=64)


def _model(cls=BertModel, seed=0, **kw):
    torch.manual_seed(seed)
    return cls.from_config(BertConfig(**TINY, **kw)).eval()


def _ids():
    return torch.randint(1, 99, (2, 7), generator=torch.Generator().manual_seed(0))


def test_keymap_both_directions():
    km = KeyMap({"encoder.layer.{}.attention.self.query.weight": "layers.{}.attn.q_proj.weight", "buf": None})
    assert km.to_ours("encoder.layer.11.attention.self.query.weight") == "layers.11.attn.q_proj.weight"
    assert km.to_hf("layers.3.attn.q_proj.weight") == "encoder.layer.3.attention.self.query.weight"
    assert km.to_ours("buf") is None
    with pytest.raises(KeyError):
        km.to_ours("encoder.layer.x.attention.self.query.weight")


def test_save_load_round_trip_is_exact(tmp_path):
    model = _model(BertForMaskedLM)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and config["num_hidden_layers"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    loaded = bunmyaku.from_pretrained(tmp_path)
    assert isinstance(loaded, BertForMaskedLM)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=_ids()).logits, model(input_ids=_ids()).logits)


def test_sharded_save_and_load(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    loaded = bunmyaku.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=_ids()).last_hidden_state, model(input_ids=_ids()).last_hidden_state)
    # saving again unsharded removes the stale shards
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("model-*-of-*.safetensors")) and (tmp_path / "model.safetensors").is_file()


def test_pytorch_bin_is_read_with_weights_only(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    state = load_state_dict(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = bunmyaku.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=_ids()).last_hidden_state, model(input_ids=_ids()).last_hidden_state)
    # a pickle that would run code is refused
    torch.save({"x": object()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        bunmyaku.from_pretrained(tmp_path)


def test_base_checkpoint_into_a_head_initialises_the_head(tmp_path, caplog):
    _model().save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        model = bunmyaku.from_pretrained(tmp_path, task="sequence-classification", num_labels=3)
    assert isinstance(model, BertForSequenceClassification) and model.config.num_labels == 3
    assert "head.classifier.weight" in caplog.text
    assert model(input_ids=_ids()).logits.shape == (2, 3)


def test_head_checkpoint_into_the_base_model(tmp_path):
    mlm = _model(BertForMaskedLM)
    mlm.save_pretrained(tmp_path)
    base = bunmyaku.from_pretrained(tmp_path, task="base")
    assert base.pooler is not None  # MLM checkpoints carry no pooler: it is initialised
    with torch.no_grad():
        assert torch.equal(base(input_ids=_ids()).last_hidden_state, mlm.backbone(input_ids=_ids()).last_hidden_state)


def test_mismatched_checkpoint_names_every_bad_tensor(tmp_path):
    _model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_size"], config["num_attention_heads"] = 40, 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        bunmyaku.from_pretrained(tmp_path)
    assert "embeddings.word_embeddings.weight: checkpoint (99, 32), model (99, 40)" in str(err.value)
    assert "encoder.layer.1.output.dense.weight" in str(err.value)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("encoder.layer.1.attention.self.key.weight")
    state["encoder.layer.7.attention.self.key.weight"] = torch.zeros(32, 32)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        bunmyaku.from_pretrained(tmp_path)
    assert "layers.1.attn.k_proj.weight" in str(err.value) and "encoder.layer.7" in str(err.value)


def test_classifier_with_other_label_count(tmp_path):
    _model(BertForSequenceClassification).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="classifier.weight: checkpoint"):
        bunmyaku.from_pretrained(tmp_path, num_labels=5)
    model = bunmyaku.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert model.head.classifier.out_features == 5


def test_corrupt_files_give_clear_errors(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: invalid JSON at line 1"):
        bunmyaku.from_pretrained(tmp_path)
    _model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        bunmyaku.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        bunmyaku.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bunmyaku.from_pretrained(tmp_path / "nowhere")
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "perceiver"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 'perceiver' is not supported"):
        bunmyaku.from_pretrained(tmp_path)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = _model()
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        _model(seed=1).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_dtype_and_config_overrides(tmp_path):
    _model().save_pretrained(tmp_path)
    model = bunmyaku.from_pretrained(tmp_path, dtype="bfloat16", attn_implementation="eager")
    assert next(model.parameters()).dtype == torch.bfloat16 and model.config.attn_implementation == "eager"
    with pytest.raises(ValueError, match="unknown dtype"):
        bunmyaku.from_pretrained(tmp_path, dtype="float13")
    with pytest.raises(ValueError, match="no 'causal-lm' head"):
        bunmyaku.from_pretrained(tmp_path, task="causal-lm")


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="hidden_size 30 is not a multiple of num_heads 4"):
        BertConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown activation 'gelu9'"):
        BertConfig(hidden_act="gelu9")


def test_hub_repo_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    """Online users pass a repo id; here the download is replaced by a local folder."""
    _model().save_pretrained(tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    model = bunmyaku.from_pretrained("someone/tiny-bert")
    assert calls == [("someone/tiny-bert", None)] and isinstance(model, BertModel)

    def offline(*args, **kwargs):
        raise OSError("hub unreachable")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a reachable hub repo id"):
        bunmyaku.from_pretrained("someone/other-bert")


def test_save_in_half_precision(tmp_path):
    model = _model(BertForMaskedLM)
    model.save_pretrained(tmp_path, dtype="float16")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float16"
    assert (tmp_path / "model.safetensors").stat().st_size < 0.6 * sum(p.numel() * 4 for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched
    loaded = bunmyaku.from_pretrained(tmp_path)  # read back as float32
    rounded = copy.deepcopy(model).half().float()  # the exact reference: every weight rounded to fp16 and back
    expected = rounded.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=_ids()).logits, rounded(input_ids=_ids()).logits, atol=0, rtol=0)


def test_from_pretrained_takes_over_the_loaded_tensors_and_leaves_the_file_alone(tmp_path, monkeypatch):
    """One copy in memory: the model adopts the checkpoint's (memory-mapped) tensors; training writes stay private."""
    import bunmyaku.models.base as base

    _model(BertForMaskedLM).save_pretrained(tmp_path)
    held = {}

    def load_and_hold(model_dir):
        held.update(load_state_dict(model_dir))
        return dict(held)  # from_pretrained empties the dict it is given, as it takes the tensors over

    monkeypatch.setattr(base, "load_state_dict", load_and_hold)
    model = BertForMaskedLM.from_pretrained(tmp_path)
    query = model.backbone.layers[0].attn.q_proj.weight
    assert query.data_ptr() == held["bert.encoder.layer.0.attention.self.query.weight"].data_ptr()
    copied = _model(BertForMaskedLM, seed=1)
    copied.load_hf_state_dict(held)  # the public default copies: the caller's tensors stay its own
    assert copied.backbone.layers[0].attn.q_proj.weight.data_ptr() != query.data_ptr()
    torch.testing.assert_close(copied(_ids()).logits, model(_ids()).logits, rtol=0, atol=0)

    before = load_state_dict(tmp_path)["bert.encoder.layer.0.attention.self.query.weight"].clone()
    with torch.no_grad():
        query.add_(1.0)  # an optimizer step on the adopted tensor
    assert torch.equal(load_state_dict(tmp_path)["bert.encoder.layer.0.attention.self.query.weight"], before)
