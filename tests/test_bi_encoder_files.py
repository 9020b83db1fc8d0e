"""A saved bi-encoder is a sentence-transformers folder: the files all-MiniLM-L6-v2 ships (modules.json,
1_Pooling/config.json, sentence_bert_config.json, config_sentence_transformers.json), with the same content,
and read module by module as sentence-transformers reads them they give the bi-encoder's embeddings."""

from __future__ import annotations

import json
import stat

import pytest
import torch

from bunmyaku.models.bert import BertConfig, BertModel
from bunmyaku.models.bi_encoder import BiEncoder
from tests.conftest import require_module

SMALL_FILES = ["modules.json", "1_Pooling/config.json", "sentence_bert_config.json"]


def read(folder, name):
    return json.loads((folder / name).read_text(encoding="utf-8"))


def tiny_bi_encoder(pooling: str) -> BiEncoder:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, max_seq_len=64)
    return BiEncoder(BertModel.from_config(config), pooling)


def test_minilm_round_trip_writes_minilm_files(minilm_dir, tmp_path):
    """Loaded and saved again, all-MiniLM-L6-v2 comes back with the very same sentence-transformers files."""
    BiEncoder.from_pretrained(minilm_dir).save_pretrained(tmp_path)
    for name in SMALL_FILES:
        assert read(tmp_path, name) == read(minilm_dir, name), name
    versions = read(tmp_path, "config_sentence_transformers.json")
    assert set(versions) == set(read(minilm_dir, "config_sentence_transformers.json")) == {"__version__"}
    assert set(versions["__version__"]) == {"bunmyaku", "pytorch"}  # never claims a sentence-transformers version


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_tiny_bi_encoder_files(pooling, minilm_dir, tmp_path):
    tiny_bi_encoder(pooling).save_pretrained(tmp_path)
    assert read(tmp_path, "modules.json") == read(minilm_dir, "modules.json")  # Transformer, Pooling, Normalize
    expected = read(minilm_dir, "1_Pooling/config.json")
    expected.update(
        word_embedding_dimension=32, pooling_mode_cls_token=pooling == "cls", pooling_mode_mean_tokens=pooling == "mean"
    )
    assert read(tmp_path, "1_Pooling/config.json") == expected
    assert read(tmp_path, "sentence_bert_config.json") == {"max_seq_length": 64, "do_lower_case": False}
    loaded = BiEncoder.from_pretrained(tmp_path)
    assert (loaded.pooling, loaded.max_seq_length) == (pooling, 64)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp")]  # every file renamed into place
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) & 0o044 == 0o044, file


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_read_as_sentence_transformers_reads_it(pooling, tmp_path):
    """sentence-transformers is not installed: its reading is written out here, module by module from
    modules.json, with transformers as the encoder, and compared with the bi-encoder's own embeddings."""
    transformers = require_module("transformers")
    model = tiny_bi_encoder(pooling).eval()
    model.save_pretrained(tmp_path)
    ids = torch.tensor([[2, 5, 7, 9, 3, 0, 0], [2, 11, 13, 17, 19, 23, 3]])
    mask = (ids != 0).long()
    x = None
    for module in read(tmp_path, "modules.json"):
        kind = module["type"].rsplit(".", 1)[-1]
        folder = tmp_path / module["path"]
        if kind == "Transformer":
            x = transformers.AutoModel.from_pretrained(folder).eval()(input_ids=ids, attention_mask=mask)[0]
        elif kind == "Pooling":
            settings = read(folder, "config.json")
            assert settings["word_embedding_dimension"] == x.shape[-1]
            if settings["pooling_mode_cls_token"]:
                x = x[:, 0]
            else:
                x = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        elif kind == "Normalize":
            x = x / x.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(x.detach(), model.embed(ids, mask))
