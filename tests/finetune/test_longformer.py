"""``finetune`` picks a Longformer from its config and trains it: classification (global <s>) and windowed QA."""

from __future__ import annotations

import json

from tests.finetune.helpers import SPECIALS, WORDS, finetune, sentiment_rows, squad_file, write_tsv


def _tiny_longformer(directory):
    """A random tiny Longformer base model (window 4, so most tokens do not see each other) with a WordPiece vocab."""
    import torch

    from bunmyaku.models.longformer import LongformerConfig, LongformerModel

    directory.mkdir(parents=True, exist_ok=True)
    vocab = SPECIALS + WORDS
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    torch.manual_seed(0)
    config = LongformerConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        max_seq_len=66,
        attention_window=4,
        pad_token_id=SPECIALS.index("[PAD]"),
        sep_token_id=SPECIALS.index("[SEP]"),
    )
    LongformerModel.from_config(config).save_pretrained(directory)
    return directory


def test_longformer_text_classification_and_qa_overfit(tmp_path):
    model = _tiny_longformer(tmp_path / "tiny")
    data = write_tsv(tmp_path / "d.tsv", sentiment_rows(16))
    out = tmp_path / "cls"
    summary = finetune(
        out,
        task="text-classification",
        model=str(model),
        train=str(data),
        eval=str(data),
        text_column="0",
        label_column="1",
    )
    assert summary["accuracy"] == 1.0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["model_type"] == "longformer" and config["architectures"] == ["LongformerForSequenceClassification"]

    squad = squad_file(tmp_path / "squad.json", 16)
    summary = finetune(
        tmp_path / "qa",
        task="question-answering",
        model=str(model),
        train=str(squad),
        eval=str(squad),
        max_length=16,
        stride=6,
        epochs=12,
    )
    assert summary["eval_examples"] == 16 and summary["exact_match"] >= 75.0
