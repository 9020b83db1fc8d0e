"""Tokenizing a corpus with several processes (MeCab runs in Python) gives exactly the serial corpus."""

from __future__ import annotations

import numpy as np

from bunmyaku.data.corpus import build_corpus
from tests.conftest import require_module

require_module("fugashi")


def test_parallel_corpus_equals_serial(shared_data, tmp_path):
    from bunmyaku.tokenization import train_tokenizer

    text = (shared_data / "aozora" / "hashire_merosu.txt").read_text(encoding="utf-8")
    corpus = tmp_path / "ja.txt"
    corpus.write_text(text, encoding="utf-8")
    tokenizer = train_tokenizer(
        [corpus], kind="wordpiece", vocab_size=1500, pre_tokenizer="mecab", output_dir=tmp_path / "tok"
    )
    built = {}
    for workers in (1, 2):
        out = tmp_path / f"corpus-{workers}"
        build_corpus([corpus], tokenizer, out, doc_split="line", word_starts=True, progress=False, workers=workers)
        built[workers] = {p.name: np.fromfile(p, dtype=np.uint8) for p in sorted(out.glob("*.bin"))}
    assert built[1].keys() == built[2].keys() and len(built[1]) >= 4
    for name in built[1]:
        assert np.array_equal(built[1][name], built[2][name]), name
    assert sum(a.size for a in built[1].values()) > 10_000
