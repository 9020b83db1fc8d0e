"""The Japanese BERT shipped in models/: transformers loads it, and it agrees with bunmyaku."""

from __future__ import annotations

import torch

import bunmyaku
from tests.conftest import ROOT, require_module
from tests.parity.helpers import assert_close

transformers = require_module("transformers")
require_module("fugashi")
MODEL = ROOT / "models" / "bunmyaku-bert-ja-small"


def test_folder_is_small_enough():
    size = sum(p.stat().st_size for p in MODEL.iterdir())
    assert size <= 25_000_000, f"{size:,} bytes"


def test_transformers_loads_it_and_outputs_match():
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL)
    hf_model = transformers.AutoModelForMaskedLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    ours_tok = bunmyaku.Tokenizer.from_pretrained(MODEL)
    ours = bunmyaku.from_pretrained(MODEL, task="masked-lm")
    texts = ["吾輩は猫である。名前はまだ無い。", "東京は日本の首都です。"]
    hf_batch = tokenizer(texts, padding=True, return_tensors="pt")
    batch = ours_tok(texts, padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == hf_batch["input_ids"].tolist()
    with torch.no_grad():
        assert_close(ours(**batch).logits, hf_model(**hf_batch).logits, batch["attention_mask"], atol=1e-4)


def test_it_learned_japanese():
    fill = bunmyaku.pipeline("fill-mask", model=MODEL, device="cpu", top_k=10)
    # a particle in a very common frame: a model that learned nothing would not rank it in its top 10
    tokens = [p["token_str"] for p in fill("私は学校[MASK]行きます。")]
    assert "に" in tokens or "へ" in tokens, tokens
