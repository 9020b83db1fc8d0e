"""Long documents (bunmyaku.tasks.windows): head-tail and window cutting checked against the full tokenization by hand,
pooling against numpy, a label signal only past max_length learned with windows and not with truncate, per-document
predictions / metrics / cv records, the max-context window for tagging with character spans, QA's windows equal to
the tokenizer's own overflow, and the pipelines' options."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import bunmyaku
from bunmyaku.tasks import windows as long
from bunmyaku.tasks.finetune import FinetuneArgs, build_task, predict_file
from bunmyaku.tokenization import Tokenizer
from tests.finetune.helpers import BAD, FILLER, GOOD, NAMES, OVERFIT, PLACES, WORDS

FAST = {"log_every": 1000, "progress": False, "plot": False, "device": "cpu", **OVERFIT}


@pytest.fixture(scope="module")
def tok(tiny_bert_dir):
    return Tokenizer.from_pretrained(tiny_bert_dir)


def random_texts(lengths, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(n)) for n in lengths]


def content(window):
    """The windowed text's token ids and their document positions."""
    pairs = [(i, p) for i, p in zip(window["input_ids"], window["_positions"], strict=True) if p is not None]
    return [i for i, _ in pairs], [p for _, p in pairs]


# ------------------------------------------------------------------------------------------------ cutting


def test_head_tail_keeps_the_first_n_and_the_last_tokens(tok):
    texts = random_texts([40, 9, 11])
    full = tok(texts, add_special_tokens=False, return_tensors=None)["input_ids"]
    cls, sep = tok.cls_token_id, tok.sep_token_id
    cut = long.cut(tok, texts, max_length=12, strategy="head-tail", head_tokens=4)
    assert len(cut) == 3
    # 12 - [CLS] - [SEP] = 10 tokens: the first 4 and the last 6
    assert cut[0]["input_ids"] == [cls, *full[0][:4], *full[0][-6:], sep]
    assert cut[1]["input_ids"] == [cls, *full[1], sep]  # short: unchanged
    assert len(full[2]) == 11 and cut[2]["input_ids"] == [cls, *full[2][:4], *full[2][-6:], sep]
    assert content(cut[0])[1] == [0, 1, 2, 3, *range(34, 40)]
    # a pair: the first text whole, the second cut head-tail in the room left
    question = tok(["who lives"], add_special_tokens=False, return_tensors=None)["input_ids"][0]
    pair = long.cut(tok, ["who lives"], [texts[0]], max_length=14, strategy="head-tail", head_tokens=3)[0]
    room = 14 - len(question) - 3
    assert pair["input_ids"] == [cls, *question, sep, *full[0][:3], *full[0][-(room - 3) :], sep]
    with pytest.raises(ValueError, match="head_tokens 10 leaves no room"):
        long.cut(tok, texts, max_length=12, strategy="head-tail", head_tokens=10)


@pytest.mark.parametrize("stride", [0, 3, 7])
def test_windows_cover_every_token_with_the_stride(tok, stride):
    lengths = [5, 10, 11, 37, 60]
    texts = random_texts(lengths, seed=stride)
    full = tok(texts, add_special_tokens=False, return_tensors=None)["input_ids"]
    room = 12 - 2
    cut = long.cut(tok, texts, max_length=12, strategy="windows", stride=stride)
    for d, ids in enumerate(full):
        windows = [w for w in cut if w["example"] == d]
        # by hand: windows start every room - stride tokens until one reaches the end
        n = len(ids)
        expected = 1 + max(0, math.ceil((n - room) / (room - stride)))
        assert len(windows) == expected
        covered = set()
        for k, w in enumerate(windows):
            assert len(w["input_ids"]) <= 12
            got, positions = content(w)
            start = k * (room - stride)
            assert positions == list(range(start, min(start + room, n)))
            assert got == ids[start : start + room]  # the document's own tokens, in order
            covered |= set(positions)
            if k:
                assert len(set(positions) & set(content(windows[k - 1])[1])) == stride
        assert covered == set(range(n))


def test_pool_matches_numpy():
    logits = torch.tensor([[1.0, -2.0], [3.0, 0.5], [0.0, 4.0], [-1.0, -1.0]])
    owner = torch.tensor([0, 0, 1, 0])
    x = logits.numpy()
    np.testing.assert_allclose(long.pool(logits, owner, 2, "mean").numpy(), [x[[0, 1, 3]].mean(0), x[2]])
    np.testing.assert_allclose(long.pool(logits, owner, 2, "max").numpy(), [x[[0, 1, 3]].max(0), x[2]])
    scores = torch.tensor([0.2, 1.5, -3.0, 0.0])
    w = np.exp([0.2, 1.5, 0.0]) / np.exp([0.2, 1.5, 0.0]).sum()
    got = long.pool(logits, owner, 2, "attention", scores).numpy()
    np.testing.assert_allclose(got, [(x[[0, 1, 3]] * w[:, None]).sum(0), x[2]], rtol=1e-6)


# ------------------------------------------------------------------------------------------------ classification

MAX_LENGTH = 16


def keyword_rows(n, seed):
    """21 filler words, the label's keyword, one more filler: the keyword sits past token MAX_LENGTH."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = [rng.choice(FILLER) for _ in range(20)] + [rng.choice(GOOD if label == "pos" else BAD)]
        rows.append({"text": " ".join([*words, rng.choice(FILLER)]), "label": label})
    return rows


@pytest.fixture(scope="module")
def windows_run(tmp_path_factory, tiny_bert_dir):
    out = tmp_path_factory.mktemp("long") / "windows"
    common = {**FAST, "model": str(tiny_bert_dir), "max_length": MAX_LENGTH, "stride": 4, "epochs": 16}
    result = bunmyaku.finetune(
        train=keyword_rows(64, 0), eval=keyword_rows(32, 1), long_strategy="windows", output_dir=out, **common
    )
    return out, result, common


def test_a_signal_past_max_length_is_learned_with_windows_not_truncate(windows_run, tok):
    texts = [r["text"] for r in keyword_rows(32, 1)]
    for text in texts:  # the keyword is beyond what truncation keeps
        ids = tok(text, return_tensors=None)["input_ids"]
        keyword = [j for j, i in enumerate(ids) if tok.convert_ids_to_tokens(i) in GOOD + BAD]
        assert keyword and keyword[0] >= MAX_LENGTH
    _, result, common = windows_run
    task = build_task(FinetuneArgs(max_length=MAX_LENGTH))  # truncate: no input holds the keyword
    keywords = set(tok(" ".join(GOOD + BAD), add_special_tokens=False, return_tensors=None)["input_ids"])
    assert not any(keywords & set(f["input_ids"]) for f in task._inputs(tok, texts, None))
    # so its accuracy is chance however long it trains: half the steps keep the file fast
    truncated = bunmyaku.finetune(train=keyword_rows(64, 0), eval=keyword_rows(32, 1), **{**common, "epochs": 8})
    assert result.metrics["accuracy"] >= 0.9
    assert truncated.metrics["accuracy"] <= 0.7


def test_predictions_and_metrics_count_documents(windows_run, tok):
    out, result, _ = windows_run
    eval_rows = keyword_rows(32, 1)
    task = result.task
    features = task.encode(tok, eval_rows)
    assert len(features) == 32 and all(len(f["input_ids"]) == 2 for f in features)  # documents holding windows
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == [r["text"] for r in eval_rows]
    hand = sum(r["label"] == r["gold"] for r in records) / len(records)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_examples"] == 32 and metrics["accuracy"] == pytest.approx(hand)
    evaluated = result.evaluate(eval_rows)
    assert evaluated["accuracy"] == pytest.approx(hand)
    assert len(result.predict([r["text"] for r in eval_rows[:5]])) == 5


def test_predict_and_evaluate_take_the_options(windows_run, tmp_path):
    from typer.testing import CliRunner

    from bunmyaku.cli import app

    out, _, _ = windows_run
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in keyword_rows(6, 1)))
    flags = ["--model", str(out), "--long-strategy", "windows", "--stride", "2", "--window-pooling", "max"]
    result = CliRunner().invoke(app, ["predict", *flags, "--input", str(data), "--output", str(tmp_path / "p.jsonl")])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 6
    result = CliRunner().invoke(app, ["evaluate", *flags, "--eval", str(data)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["evaluate", "--model", str(out), "--eval", str(data), "--long-strategy", "x"])
    assert result.exit_code != 0 and "unknown long_strategy" in result.output


def test_training_batches_keep_a_documents_windows_together(tok):
    task = build_task(FinetuneArgs(long_strategy="windows", max_length=MAX_LENGTH, stride=4))
    rows = keyword_rows(3, 0) + [{"text": "great film", "label": "pos"}]
    task.fit_labels(rows)
    features = [{**f, "index": i} for i, f in enumerate(task.encode(tok, rows))]
    batch = task.collate(features, 0)
    per_doc = [len(f["input_ids"]) for f in features]
    assert batch["window_doc"].tolist() == [d for d, n in enumerate(per_doc) for _ in range(n)]
    assert batch["input_ids"].shape[0] == sum(per_doc) and batch["labels"].shape == (4,)
    assert task.count(batch) == 4  # the loss averages over documents


def test_sentence_pairs_window_the_second_text(tok):
    settings = FinetuneArgs(text_pair_column="pair", long_strategy="windows", max_length=MAX_LENGTH, stride=2)
    task = build_task(settings)
    rows = [{"text": "who lives", "pair": random_texts([30], seed=5)[0], "label": "pos"}]
    task.fit_labels(rows)
    (feature,) = task.encode(tok, rows)
    first = tok("who lives", return_tensors=None)["input_ids"]  # [CLS] who lives [SEP]
    second = tok(rows[0]["pair"], add_special_tokens=False, return_tensors=None)["input_ids"]
    room = MAX_LENGTH - len(first) - 1
    assert len(feature["input_ids"]) == 1 + math.ceil((len(second) - room) / (room - 2))
    for k, ids in enumerate(feature["input_ids"]):
        start = k * (room - 2)
        assert ids == [*first, *second[start : start + room], tok.sep_token_id]


def test_attention_pooling_is_saved_beside_a_model_transformers_loads(tmp_path, tiny_bert_dir):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "attention"
    common = {**FAST, "model": str(tiny_bert_dir), "max_length": MAX_LENGTH, "stride": 4, "epochs": 2}
    result = bunmyaku.finetune(
        train=keyword_rows(16, 0),
        eval=keyword_rows(8, 1),
        long_strategy="windows",
        window_pooling="attention",
        output_dir=out,
        **common,
    )
    model_dir = out / "model"
    weights = load_file(str(model_dir / long.POOLER_FILE))
    trained = result.model.window_pooler.score.weight.detach()
    assert torch.equal(weights["weight"], trained) and trained.abs().sum() > 0  # it trained away from zero
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir)  # per-window use
    assert hf.config.num_labels == 2
    rows = keyword_rows(8, 1)
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    predict_file(out, data, tmp_path / "p.jsonl")
    again = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    saved = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["score"] for r in again] == pytest.approx([r["score"] for r in saved], abs=1e-5)
    pipe = bunmyaku.pipeline("text-classification", model=str(model_dir), device="cpu", **_long("attention"))
    got = pipe([r["text"] for r in rows])
    assert [g["score"] for g in got] == pytest.approx([r["score"] for r in saved], abs=1e-5)
    assert [g["label"] for g in got] == [r["label"] for r in saved]
    # without options, a pipeline reads the run's model as predict does: its windows, pooling and max_length
    plain = bunmyaku.pipeline("text-classification", model=str(out), device="cpu")
    assert (plain.long_strategy, plain.window_pooling, plain.max_length, plain.stride) == (
        "windows",
        "attention",
        MAX_LENGTH,
        4,
    )
    assert [g["score"] for g in plain([r["text"] for r in rows])] == pytest.approx(
        [r["score"] for r in saved], abs=1e-5
    )
    given = bunmyaku.pipeline("text-classification", model=str(out), device="cpu", long_strategy="truncate")
    assert (given.long_strategy, given.max_length) == ("truncate", MAX_LENGTH)  # a given option wins
    # transformers as the oracle: its per-window logits and [CLS] vectors, pooled by hand with the saved scorer
    hf.eval()
    expected = []
    for text in [r["text"] for r in rows]:
        cut = long.cut(Tokenizer.from_pretrained(model_dir), [text], max_length=MAX_LENGTH, stride=4)
        with torch.no_grad():
            outs = [hf(input_ids=torch.tensor([w["input_ids"]]), output_hidden_states=True) for w in cut]
        cls = np.concatenate([o.hidden_states[-1][:, 0].numpy() for o in outs])
        score = cls @ weights["weight"].numpy()[0] + weights["bias"].numpy()[0]
        share = np.exp(score - score.max()) / np.exp(score - score.max()).sum()
        logits = (np.concatenate([o.logits.numpy() for o in outs]) * share[:, None]).sum(0)
        expected.append(float(np.exp(logits).max() / np.exp(logits).sum()))
    assert [r["score"] for r in saved] == pytest.approx(expected, abs=1e-5)
    assert len({round(float(x), 6) for x in share}) > 1  # the learned weights are not all equal


def _long(pooling):
    return {"long_strategy": "windows", "stride": 4, "max_length": MAX_LENGTH, "window_pooling": pooling}


def test_cv_keeps_one_record_per_document(tmp_path, tiny_bert_dir):
    rows = keyword_rows(8, 0)
    result = bunmyaku.cv(
        model=str(tiny_bert_dir),
        train=rows,
        folds=2,
        long_strategy="windows",
        max_length=MAX_LENGTH,
        stride=4,
        output_dir=tmp_path / "cv",
        **{**FAST, "epochs": 1},
    )
    assert len(result.oof) == 8 and [r["text"] for r in result.oof] == [r["text"] for r in rows]
    assert all(len(r["scores"]) == 2 for r in result.oof)


def test_options_are_checked(tiny_bert_dir):
    with pytest.raises(ValueError, match="resumable checkpoints"):
        bunmyaku.finetune(
            model=str(tiny_bert_dir),
            train=keyword_rows(4, 0),
            eval_split=0.5,
            long_strategy="windows",
            window_pooling="attention",
            save_every=1,
            **FAST,
        )
    with pytest.raises(ValueError, match="head-tail is for text-classification"):
        FinetuneArgs(task="token-classification", long_strategy="head-tail")
    with pytest.raises(ValueError, match="unknown long_strategy"):
        FinetuneArgs(long_strategy="sliding")
    with pytest.raises(ValueError, match="not multiple-choice"):
        FinetuneArgs(task="multiple-choice", long_strategy="windows")
    with pytest.raises(ValueError, match="multi_sample_dropout averages"):
        FinetuneArgs(long_strategy="windows", multi_sample_dropout=4)
    with pytest.raises(ValueError, match="head_tokens 300 leaves no room"):
        FinetuneArgs(long_strategy="head-tail", head_tokens=300, max_length=256)


# ------------------------------------------------------------------------------------------------ tagging


def test_best_windows_take_the_most_context(tok):
    text = random_texts([30], seed=4)[0]
    cut = long.cut(tok, [text], max_length=12, strategy="windows", stride=6)
    spans = [content(w)[1] for w in cut]
    chosen = long.best_windows(cut)
    n = len(tok(text, add_special_tokens=False, return_tensors=None)["input_ids"])
    assert sorted(chosen) == list(range(n))
    for p in range(n):
        # by hand: among the windows holding p, the largest min(left, right); the first on a tie
        best, best_context = None, -1
        for w, positions in enumerate(spans):
            if p in positions:
                context = min(p - positions[0], positions[-1] - p)
                if context > best_context:
                    best, best_context = w, context
        w, j = chosen[p]
        assert w == best and cut[w]["_positions"][j] == p


def long_ner_record(seed):
    rng = random.Random(seed)
    prefix = " ".join(rng.choice(FILLER) for _ in range(25))
    name, place = rng.choice(NAMES), rng.choice(PLACES)
    text = f"{prefix} {name} lives in {place} ."
    start, place_start = len(prefix) + 1, text.index(f" in {place}") + 4
    entities = [
        {"start": start, "end": start + len(name), "type": "PER"},
        {"start": place_start, "end": place_start + len(place), "type": "LOC"},
    ]
    return {"text": text, "entities": entities}


def test_tagging_windows_give_document_spans_past_the_first_window(tok):
    task = build_task(
        FinetuneArgs(task="token-classification", format="spans", label_column="entities", long_strategy="windows")
    )
    task.settings.max_length, task.settings.stride = 12, 4
    records = task.read_records([long_ner_record(0), long_ner_record(1)])
    task.fit_labels(records)
    features = task.encode(tok, records)
    assert len(features) > len(records)
    first_window_end = max(o[1] for o in features[0]["_offsets"] if o)
    assert all(e["start"] >= first_window_end for r in records for e in r["_entities"])
    outside = task.labels.index("O")
    # an oracle model: every window predicts its own gold tags, except at the window edges, where it is wrong
    outputs = []
    for f in features:
        tags = torch.tensor([outside if t == -100 else t for t in f["labels"]])
        inside = [j for j, p in enumerate(f["_positions"]) if p is not None]
        for j in (inside[0], inside[-1]):  # no context on one side: the max-context rule never reads these
            if f["_positions"][j] != 0 and f is not features_last(features, f):
                tags[j] = task.labels.index("B-PER")
        outputs.append(tags)
    predicted = task.predictions(records, features, outputs)
    assert len(predicted) == 2
    for record, p in zip(records, predicted, strict=True):
        assert [(e["start"], e["end"], e["type"]) for e in p["entities"]] == [
            (e["start"], e["end"], e["type"]) for e in record["_entities"]
        ]
        assert [e["text"] for e in p["entities"]] == [
            record["text"][e["start"] : e["end"]] for e in record["_entities"]
        ]
    assert task.metrics(records, features, outputs)["f1"] == 1.0
    # cv's per-example scores (character units of each text) come from the same merged windows
    from bunmyaku.tasks.averaging import example_scores, tag_predictions

    probabilities = [torch.nn.functional.one_hot(o, len(task.labels)).float() for o in outputs]
    scores = example_scores(task, records, features, probabilities)
    assert [len(u) for u in scores] == [len(r["text"]) for r in records]
    decoded = tag_predictions(scores, task.labels, [r["text"] for r in records])
    for record, d in zip(records, decoded, strict=True):
        assert [(e["start"], e["end"]) for e in d["entities"]] == [(e["start"], e["end"]) for e in record["_entities"]]


def features_last(features, f):
    """The last window of f's document (its last token has no window after it)."""
    return [g for g in features if g["example"] == f["example"]][-1]


# ------------------------------------------------------------------------------------------------ QA and pipelines


def test_qa_windows_equal_the_tokenizers_overflow(tok):
    from bunmyaku.data.tables import QAExample
    from bunmyaku.tasks.qa import prepare_features

    contexts = random_texts([40, 8, 25], seed=7)
    examples = [QAExample(str(i), "who lives in tokyo ?", c, [], True) for i, c in enumerate(contexts)]
    got = prepare_features(tok, examples, max_length=16, stride=3)
    enc = tok(
        [e.question for e in examples],
        contexts,
        truncation="only_second",
        max_length=16,
        stride=3,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
        return_tensors="pt",
    )
    assert got.example_index == enc["overflow_to_sample_mapping"].tolist()
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(got.inputs[key], enc[key])
    for w in range(len(got.example_index)):
        seq = enc.sequence_ids(w)
        assert got.offsets[w] == [
            tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][w].tolist(), seq, strict=True)
        ]


def test_token_pipeline_options(tmp_path, tiny_bert_dir):
    model = bunmyaku.from_pretrained(
        tiny_bert_dir, task="token-classification", num_labels=3, ignore_mismatched_sizes=True
    )
    model.save_pretrained(tmp_path / "ner")
    Tokenizer.from_pretrained(tiny_bert_dir).save_pretrained(tmp_path / "ner")
    text = random_texts([40], seed=2)[0]
    kwargs = {"model": str(tmp_path / "ner"), "device": "cpu", "max_length": 12, "stride": 4, "aggregation": "none"}
    windows = bunmyaku.pipeline("token-classification", ignore_labels=(), **kwargs)
    truncated = bunmyaku.pipeline("token-classification", ignore_labels=(), long_strategy="truncate", **kwargs)
    assert len(windows(text)) == 40 and len(truncated(text)) == 10  # every word / the first window's
    with pytest.raises(ValueError, match="windows or truncate"):
        bunmyaku.pipeline("token-classification", long_strategy="head-tail", **kwargs)
    with pytest.raises(ValueError, match="always windows"):
        bunmyaku.pipeline("question-answering", model=str(tmp_path / "ner"), long_strategy="truncate")
