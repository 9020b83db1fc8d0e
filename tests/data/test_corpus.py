"""Corpus building and reading: documents, dtype, held-out split, packing, NSP pairs, bad input, batch streams."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from bunmyaku.data import (
    BatchStream,
    PackedBlocks,
    SegmentPairs,
    Split,
    TokenCorpus,
    build_corpus,
    read_documents,
    token_dtype,
)
from bunmyaku.data.lm import CausalLMCollator
from bunmyaku.tokenization import Tokenizer

EOS = 0


def word_tokenizer(words: list[str]) -> Tokenizer:
    """A WordLevel tokenizer over whitespace words: id 0 is <eos>, 1 <unk>."""
    vocab = {"<eos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(sorted(set(words)))}}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, {"eos_token": "<eos>", "unk_token": "<unk>"})


def _split(docs: list[list[int]]) -> Split:
    tokens = np.concatenate([np.asarray(d, dtype=np.uint16) for d in docs])
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    return Split(tokens, offsets)


def test_documents_by_blank_line_by_line_and_jsonl(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("one two\nthree\n\n\nfour five\n", encoding="utf-8")
    assert list(read_documents(text)) == ["one two\nthree", "four five"]
    assert list(read_documents(text, doc_split="line")) == ["one two", "three", "four five"]
    assert list(read_documents(text, doc_split="file")) == ["one two\nthree\n\n\nfour five"]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "six seven"}\n\n{"text": "eight", "id": 3}\n', encoding="utf-8")
    assert list(read_documents(jsonl)) == ["six seven", "eight"]


def test_build_keeps_documents_and_splits_off_held_out_documents(tmp_path):
    words = [f"w{i}" for i in range(50)]
    lines = [" ".join(words[i % 50 : i % 50 + 1 + i % 7]) for i in range(200)]
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(lines), encoding="utf-8")
    tok = word_tokenizer(words)
    corpus = build_corpus([src], tok, tmp_path / "out", doc_split="line", valid_fraction=0.1, progress=False)
    train, valid = corpus.split("train"), corpus.split("valid")
    assert train.tokens.dtype == np.uint16
    assert train.num_docs + valid.num_docs == 200
    expected = sorted(tuple(tok.backend.encode(line, add_special_tokens=False).ids) for line in lines)
    got = sorted(tuple(int(x) for x in s.document(d)) for s in (train, valid) for d in range(s.num_docs))
    assert got == expected
    total = len(train.tokens) + len(valid.tokens)
    assert 0.05 < len(valid.tokens) / total <= 0.1
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["splits"]["train"]["num_docs"] == train.num_docs and index["special_ids"]["eos"] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_a_single_document_is_split_at_the_tail(tmp_path):
    src = tmp_path / "one.txt"
    src.write_text(" ".join(f"w{i % 9}" for i in range(1000)), encoding="utf-8")
    corpus = build_corpus([src], word_tokenizer([f"w{i}" for i in range(9)]), tmp_path / "c", valid_fraction=0.1)
    assert len(corpus.split("train").tokens) == 900 and len(corpus.split("valid").tokens) == 100


def test_a_killed_build_leaves_temporaries_the_next_build_removes_but_not_a_live_ones(tmp_path):
    import fcntl
    import threading

    src = tmp_path / "a.txt"
    src.write_text("w1 w2\n\nw3\n", encoding="utf-8")
    tok = word_tokenizer(["w1", "w2", "w3"])
    killed = tmp_path / ".out.tmp-killed1"  # what a kill -9 in the middle of a build leaves
    killed.mkdir()
    (killed / "all.bin").write_bytes(b"\0" * 64)

    # a live build holds the lock: its temporary stays, and a second build waits for it
    live = tmp_path / ".out.tmp-live"
    live.mkdir()
    with open(tmp_path / ".out.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiting = threading.Thread(target=build_corpus, args=([src], tok, tmp_path / "out"), kwargs={"progress": False})
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive() and live.is_dir() and killed.is_dir() and not (tmp_path / "out").exists()
    waiting.join(timeout=30)  # the lock is released: the holder is gone, its temporaries are stale
    assert not waiting.is_alive()
    assert not killed.exists() and not live.exists()
    assert (
        TokenCorpus(tmp_path / "out").split("train").num_docs + TokenCorpus(tmp_path / "out").split("valid").num_docs
        == 2
    )
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_dtype_follows_the_vocabulary_size():
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"\n\n  \n", "corpus is empty"),
        ("latin1.txt", "caf\u00e9\n".encode("utf-8") + b"ok\nna\xefve\n", "byte offset 11"),
        ("bad.jsonl", b'{"text": "a"}\n{"body": "b"}\n', r"bad.jsonl:2: the record has no 'text' field"),
        ("broken.jsonl", b'{"text": "a"}\n{"text": \n', r"broken.jsonl:2: invalid JSON"),
    ],
)
def test_bad_input_gives_a_clear_error_and_no_output(tmp_path, name, content, message):
    src = tmp_path / name
    src.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        build_corpus([src], word_tokenizer(["a", "b"]), out, progress=False)
    assert not out.exists()
    # nothing but the empty lock file that lets builds of one corpus take turns
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", name]
    assert (tmp_path / ".out.lock").stat().st_size == 0


def test_packing_puts_eos_between_documents_and_cuts_exact_blocks():
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    blocks = PackedBlocks(_split(docs), block_size=4, separator=EOS)
    stream = [t for d in docs for t in [*d, EOS]]
    assert len(blocks) == len(stream) // 4
    got = np.concatenate([blocks[i]["input_ids"] for i in range(len(blocks))])
    assert got.tolist() == stream[: len(blocks) * 4]
    assert all(len(blocks[i]["input_ids"]) == 4 for i in range(len(blocks)))
    batch = CausalLMCollator()([blocks[0], blocks[1]])
    assert (
        batch["input_ids"].tolist() == [[5, 6, 7, EOS], [8, EOS, 9, 10]]
        and (batch["labels"] == batch["input_ids"]).all()
    )


def test_packing_with_random_offsets_and_cls_sep():
    docs = [list(range(10, 40)), list(range(40, 70))]
    blocks = PackedBlocks(_split(docs), block_size=6, separator=2, prefix=[1], suffix=[2], random_offset=True)
    stream = [t for d in docs for t in [*d, 2]]
    offsets = set()
    for epoch in range(6):
        blocks.set_epoch(epoch)
        offsets.add(blocks.offset)
        for i in range(len(blocks)):
            ids = blocks[i]["input_ids"].tolist()
            assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 8
            start = blocks.offset + 6 * i
            assert ids[1:-1] == stream[start : start + 6]
    assert len(offsets) > 1


def test_nsp_pairs_are_half_next_half_random_within_budget():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(10, 1000, rng.integers(40, 300))) for _ in range(150)]
    pairs = SegmentPairs(_split(docs), max_length=64, cls_id=1, sep_id=2, seed=3)
    labels = []
    for i in range(len(pairs)):
        example = pairs[i]
        ids, segments = example["input_ids"], example["token_type_ids"]
        assert len(ids) <= 64 and ids[0] == 1 and ids[-1] == 2 and (ids == 2).sum() == 2
        first_sep = int(np.flatnonzero(ids == 2)[0])
        assert (segments[: first_sep + 1] == 0).all() and (segments[first_sep + 1 :] == 1).all()
        assert first_sep >= 2 and len(ids) - first_sep >= 3  # both segments non-empty
        labels.append(example["next_sentence_label"])
    assert len(labels) > 400
    assert abs(np.mean(labels) - 0.5) < 0.06


def test_batch_streams_shard_the_same_global_batches_and_resume():
    data = list(range(40))

    def collate(examples, epoch, indices):
        return {"ids": examples}

    single = BatchStream(data, collate, batch_size=8, seed=1)
    ranks = [BatchStream(data, collate, batch_size=4, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(12):  # crosses epochs
        assert sorted(single.next_batch()["ids"]) == sorted(ranks[0].next_batch()["ids"] + ranks[1].next_batch()["ids"])
    state = single.state_dict()
    expected = [single.next_batch()["ids"] for _ in range(3)]
    resumed = BatchStream(data, collate, batch_size=8, seed=1)
    resumed.load_state_dict(state)
    assert [resumed.next_batch()["ids"] for _ in range(3)] == expected


def test_opening_a_folder_that_is_not_a_corpus(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a built corpus"):
        TokenCorpus(tmp_path)
