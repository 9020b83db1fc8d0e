"""MarianMT tokenizer folders (source.spm + vocab.json): the same ids and text as transformers' MarianTokenizer."""

from __future__ import annotations

import json
import random
import shutil

import pytest

import bunmyaku
from tests.conftest import require_module

transformers = require_module("transformers")
spm = require_module("sentencepiece")


@pytest.fixture(scope="module")
def marian_folder(shared_data, tmp_path_factory):
    """A Marian-style folder: vocab.json numbers the pieces in its own order and adds target-only pieces."""
    folder = tmp_path_factory.mktemp("marian")
    lines = (shared_data / "botchan-en" / "botchan.txt").read_text(encoding="utf-8").splitlines()
    (folder / "corpus.txt").write_text("\n".join(lines[:2000]), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"),
        model_prefix=str(folder / "s"),
        vocab_size=500,
        model_type="unigram",
        eos_id=0,
        unk_id=1,
        bos_id=-1,
        pad_id=-1,
        minloglevel=2,
    )
    shutil.move(folder / "s.model", folder / "source.spm")
    shutil.copy(folder / "source.spm", folder / "target.spm")
    processor = spm.SentencePieceProcessor(model_file=str(folder / "source.spm"))
    pieces = [processor.id_to_piece(i) for i in range(2, processor.get_piece_size())]
    pieces += ["▁Zielwort", "▁außer", "ßen"]  # target-language pieces the source model lacks
    random.Random(0).shuffle(pieces)
    vocab = {"</s>": 0, "<unk>": 1, **{p: i + 2 for i, p in enumerate(pieces)}}
    vocab["<pad>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    config = {
        "tokenizer_class": "MarianTokenizer",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": 512,
        "source_lang": "en",
        "target_lang": "de",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder, lines[2000:2400], vocab


def test_ids_and_decoding_match_marian_tokenizer(marian_folder):
    folder, lines, vocab = marian_folder
    hf = transformers.MarianTokenizer.from_pretrained(folder)
    ours = bunmyaku.Tokenizer.from_pretrained(folder)
    texts = [t for t in lines if t.strip()] + ["außer Zielwort ß", "", "  Ｆｕｌｌ width  ", "naïve café 😀"]
    assert len(texts) > 100
    for text in texts:
        assert ours(text, return_tensors=None)["input_ids"] == hf(text).input_ids, text
    for text in texts[:100]:
        ids = hf(text).input_ids
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    # target-only pieces decode to their text (the model's translations are made of them)
    target = [vocab["▁außer"], vocab["▁Zielwort"], vocab["</s>"]]
    assert (
        ours.decode(target, skip_special_tokens=True) == hf.decode(target, skip_special_tokens=True) == "außer Zielwort"
    )
    batch = ours(["a short one", "and a longer sentence here"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, -1].item() == vocab["<pad>"] and ours.pad_token_id == vocab["<pad>"]
