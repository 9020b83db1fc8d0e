"""Tiny models (hidden 32, 2 layers, 4 heads) saved with a word-level WordPiece vocabulary, and tiny data sets."""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
GOOD = ["great", "lovely", "superb", "happy", "fine", "nice"]
BAD = ["awful", "sad", "poor", "nasty", "grim", "dull"]
FILLER = ["the", "a", "movie", "film", "was", "very", "and", "plot", "cast", "is", "what", "who", "where", "went"]
NAMES = ["taro", "hanako", "ken", "yuki"]
PLACES = ["tokyo", "osaka", "kyoto", "nara"]
WORDS = GOOD + BAD + FILLER + NAMES + PLACES + [",", ".", "?", "to", "lives", "in"]
OVERFIT = {"epochs": 8, "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.0, "warmup_steps": 0, "schedule": "constant"}


def finetune(out, **settings):
    """bunmyaku.finetune with flat settings, quiet and fast; returns what metrics.json holds."""
    import bunmyaku

    settings = {"log_every": 1000, "progress": False, "plot": False, "device": "cpu", **OVERFIT, **settings}
    return bunmyaku.finetune(output_dir=out, **settings).metrics


def write_tsv(path: Path, rows) -> Path:
    """Rows of fields as a headerless TSV."""
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    return path


def save_tiny(directory: Path, kind: str = "bert", seed: int = 0) -> Path:
    """A randomly initialised tiny BERT (``BertModel``) or GPT-2 folder with a vocab.txt, as a pretrained model."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    vocab = SPECIALS + WORDS
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(seed)
    if kind == "bert":
        from bunmyaku.models.bert import BertConfig, BertModel

        config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_layers=2, num_heads=4, max_seq_len=64)
        BertModel.from_config(config).save_pretrained(directory)
    else:
        from bunmyaku.models.gpt2 import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=len(vocab), hidden_size=32, num_layers=2, num_heads=4, max_seq_len=64)
        GPT2LMHeadModel.from_config(config).save_pretrained(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    return directory


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) rows: the label follows the sentiment words in the text."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, 3) + rng.sample(GOOD if label == "pos" else BAD, 2)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def ner_records(n: int, seed: int = 0) -> list[dict]:
    """ja-wikipedia-ner-style records: text and character-span entities (PER, LOC)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        name, place = rng.choice(NAMES), rng.choice(PLACES)
        prefix = " ".join(rng.sample(FILLER, 2))
        text = f"{prefix} {name} lives in {place} ."
        start = len(prefix) + 1
        place_start = text.index(f" in {place}") + 4
        entities = [
            {"name": name, "span": [start, start + len(name)], "type": "PER"},
            {"name": place, "span": [place_start, place_start + len(place)], "type": "LOC"},
        ]
        records.append({"text": text, "entities": entities})
    return records


def squad_file(path: Path, n: int, seed: int = 0) -> Path:
    """A SQuAD 1.1 file: "who lives in X ?" answered by the name in the context."""
    rng = random.Random(seed)
    articles = []
    for i in range(n):
        name, place = rng.choice(NAMES), PLACES[i % len(PLACES)]
        context = f"{' '.join(rng.sample(FILLER, 3))} {name} lives in {place} ."
        start = context.index(f" {name} lives") + 1
        qa = {"id": f"q{i}", "question": f"who lives in {place} ?", "answers": [{"text": name, "answer_start": start}]}
        articles.append({"title": f"t{i}", "paragraphs": [{"context": context, "qas": [qa]}]})
    path.write_text(json.dumps({"version": "1.1", "data": articles}))
    return path
