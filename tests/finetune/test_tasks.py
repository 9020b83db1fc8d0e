"""Every task family through its task module on tiny models: shapes, loss falls, 16 examples overfit."""

from __future__ import annotations

import json

import pytest
import torch

from bunmyaku.tasks.base import GroupedBatches, collate_features
from bunmyaku.tasks.finetune import FinetuneArgs, build_task
from tests.finetune.helpers import GOOD, finetune, ner_records, sentiment_rows, squad_file, write_tsv


def train_losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r and "eval_loss" not in r]


def test_single_label_overfits_and_loss_falls(tmp_path, tiny_bert_dir):
    data = write_tsv(tmp_path / "d.tsv", sentiment_rows(16))
    out = tmp_path / "run"
    summary = finetune(
        out,
        task="text-classification",
        model=str(tiny_bert_dir),
        train=str(data),
        eval=str(data),
        text_column="0",
        label_column="1",
        log_every=1,
    )
    assert summary["accuracy"] == 1.0 and summary["f1"] == 1.0
    losses = train_losses(out)
    assert losses[-1] < losses[0] - 0.05
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["problem_type"] == "single_label_classification"


def test_multi_label(tmp_path, tiny_bert_dir):
    rows = [{"text": t, "tags": ["pos", "long"] if lab == "pos" else ["neg"]} for t, lab in sentiment_rows(16)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = finetune(
        tmp_path / "run",
        task="text-classification",
        problem_type="multi-label",
        model=str(tiny_bert_dir),
        train=str(data),
        eval=str(data),
        label_column="tags",
    )
    assert summary["accuracy"] == 1.0
    prediction = json.loads((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()[0])
    assert set(prediction["scores"]) == {"long", "neg", "pos"}


def test_regression_pairs_cross_encoder(tmp_path, tiny_bert_dir):
    rows = [{"a": t, "b": "nice film", "score": 5.0 if lab == "pos" else 0.0} for t, lab in sentiment_rows(16)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = finetune(
        tmp_path / "run",
        task="sentence-similarity",
        model=str(tiny_bert_dir),
        train=str(data),
        eval=str(data),
        text_column="a",
        text_pair_column="b",
        label_column="score",
        lr=1e-3,
    )
    assert summary["pearson"] > 0.75 and summary["spearman"] > 0.7


def test_pair_collation_has_segments():
    task = build_task(FinetuneArgs(text_column="a", text_pair_column="b"))
    task.labels = ["x", "y"]

    class Tok:
        def __call__(self, texts, pairs, **kw):
            return {
                "input_ids": [[2, 5, 3, 6, 6, 3], [2, 5, 3, 6, 3]],
                "token_type_ids": [[0, 0, 0, 1, 1, 1]] * 2,
                "attention_mask": [[1] * 6, [1] * 5],
            }

    features = task.encode(Tok(), [{"a": "p", "b": "q", "label": "x"}, {"a": "p", "b": "q", "label": "y"}])
    batch = collate_features(GroupedBatches(features, 2)[0], pad=0)
    assert batch["input_ids"].shape == (2, 6) and batch["token_type_ids"][0].tolist() == [0, 0, 0, 1, 1, 1]
    assert batch["attention_mask"].sum().item() == 11 and sorted(batch["labels"].tolist()) == [0, 1]


def test_ner_spans_overfit_and_char_spans(tmp_path, tiny_bert_dir):
    data = tmp_path / "ner.json"
    records = ner_records(16)
    data.write_text(json.dumps(records, ensure_ascii=False))
    summary = finetune(
        tmp_path / "run",
        task="token-classification",
        format="spans",
        model=str(tiny_bert_dir),
        train=str(data),
        eval=str(data),
        label_column="entities",
    )
    assert summary["f1"] == 1.0
    prediction = json.loads((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()[0])
    gold = [{"start": e["span"][0], "end": e["span"][1], "type": e["type"]} for e in records[0]["entities"]]
    assert [{k: e[k] for k in ("start", "end", "type")} for e in prediction["entities"]] == gold


def test_ner_conll_iob1(tmp_path, tiny_bert_dir):
    lines = []
    for record in ner_records(16):
        for word in record["text"].split():
            tag = "I-PER" if word in {e["name"] for e in record["entities"] if e["type"] == "PER"} else "O"
            if word in {e["name"] for e in record["entities"] if e["type"] == "LOC"}:
                tag = "I-LOC"
            lines.append(f"{word} X {tag}")
        lines.append("")
    data = tmp_path / "d.conll"
    data.write_text("\n".join(lines))
    summary = finetune(
        tmp_path / "run",
        task="token-classification",
        format="conll",
        tag_scheme="iob1",
        model=str(tiny_bert_dir),
        train=str(data),
        eval=str(data),
    )
    assert summary["f1"] == 1.0
    prediction = json.loads((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()[0])
    assert "B-PER" in prediction["tags"] and "B-LOC" in prediction["tags"]


def test_qa_windows_overfit(tmp_path, tiny_bert_dir):
    data = squad_file(tmp_path / "squad.json", 16)
    summary = finetune(
        tmp_path / "run",
        task="question-answering",
        model=str(tiny_bert_dir),
        train=str(data),
        eval=str(data),
        max_length=16,
        stride=6,
        epochs=20,
    )
    assert summary["eval_examples"] == 16
    assert summary["exact_match"] >= 75.0 and summary["f1"] >= summary["exact_match"]


def test_multiple_choice_overfits(tmp_path, tiny_bert_dir):
    rows = []
    for i, (text, _) in enumerate(sentiment_rows(16)):
        choices = ["sad", "dull", "grim"]
        label = i % 3
        choices[label] = GOOD[i % len(GOOD)]
        rows.append({"question": text, **{f"choice{j}": c for j, c in enumerate(choices)}, "label": label})
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = finetune(
        tmp_path / "run",
        task="multiple-choice",
        model=str(tiny_bert_dir),
        train=str(data),
        eval=str(data),
        text_column="question",
        choice_columns="choice0,choice1,choice2",
    )
    assert summary["accuracy"] == 1.0


def test_gpt_pair_classification(tmp_path, tiny_gpt2_dir):
    rows = []
    for i, (text, _) in enumerate(sentiment_rows(16)):
        good, bad = GOOD[i % len(GOOD)], "grim"
        rows.append({"text": text, "c0": good if i % 2 else bad, "c1": bad if i % 2 else good, "label": 1 - i % 2})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    summary = finetune(
        out,
        task="pair-classification",
        model=str(tiny_gpt2_dir),
        train=str(data),
        eval=str(data),
        choice_columns="c0,c1",
        lm_weight=0.5,
    )
    assert summary["accuracy"] == 1.0
    config = json.loads((out / "model" / "config.json").read_text())
    assert (
        config["architectures"] == ["GPT2DoubleHeadsModel"]
        and config["vocab_size"] == len((tiny_gpt2_dir / "vocab.txt").read_text().split()) + 3
    )


@pytest.mark.parametrize("loss", ["contrastive", "cosine"])
def test_bi_encoder(tmp_path, tiny_bert_dir, loss):
    rows = [{"a": t, "b": t.split()[0] + " " + lab, "score": 1.0} for t, lab in sentiment_rows(16)]
    rows += [{"a": t, "b": "dull grim", "score": 0.0} for t, _ in sentiment_rows(8, seed=1)] if loss == "cosine" else []
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    summary = finetune(
        out,
        task="sentence-similarity",
        encoder="bi",
        loss=loss,
        model=str(tiny_bert_dir),
        train=str(data),
        eval=str(data),
        text_column="a",
        text_pair_column="b",
        label_column="score" if loss == "cosine" else None,
        lr=1e-3,
    )
    history = summary["history"]
    if loss == "contrastive":
        assert history[-1]["loss"] < history[0]["loss"] and summary["accuracy"] > 0.5
    else:
        assert summary["pearson"] > 0.8
    assert (out / "model" / "1_Pooling" / "config.json").is_file()


def test_length_grouped_batches_cover_every_row_once():
    features = [{"input_ids": list(range(n % 13 + 1)), "example": n} for n in range(100)]
    data = GroupedBatches(features, 8, shuffle=True, seed=0)
    seen = sorted(f["index"] for i in range(len(data)) for f in data[i])
    assert seen == list(range(100)) and len(data) == 13
    spread = [max(len(f["input_ids"]) for f in data[i]) - min(len(f["input_ids"]) for f in data[i]) for i in range(12)]
    assert sum(spread) / len(spread) < 3  # sorted inside mega-batches: little padding
    data.set_epoch(1)
    assert sorted(f["index"] for i in range(len(data)) for f in data[i]) == list(range(100))
    assert torch.tensor(seen).numel() == 100
