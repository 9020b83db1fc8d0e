"""bench/ja_pretrain_compare.py's plumbing on a synthetic data tree: the corpus keeps every evaluation row out, the
three models share one budget, every model fine-tunes on every task, results are written and reused on a rerun.
No figure of merit is asserted (the models are tiny and train for two steps)."""

from __future__ import annotations

import json
import lzma
import math
import random
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, require_module

require_module("fugashi", "the shipped tokenizer splits words with MeCab")

from bench import ja_pretrain_compare as compare  # noqa: E402

WORDS = ["猫", "犬", "学校", "先生", "電車", "東京", "本", "雨", "山", "川", "花", "友達", "映画", "料理", "時計"]
VERBS = ["が好きだ", "を見た", "に行った", "がある", "を買った", "と話した"]


def _sentence(rng: random.Random, tag: str) -> str:
    return f"{tag}{rng.choice(WORDS)}は{rng.choice(WORDS)}{rng.choice(VERBS)}。"


def _data_tree(root, rng: random.Random):
    """The shared-data files the script reads, small, every sentence tagged with where it comes from."""
    works = ["\n".join(_sentence(rng, f"青空{w}の{i}") for i in range(6)) for w in range(12)]
    (root / "aozora-150m").mkdir(parents=True)
    with lzma.open(root / "aozora-150m" / "ja_corpus.txt.xz", "wt", encoding="utf-8") as f:
        f.write("\n\n".join(works) + "\n")
    (root / "livedoor").mkdir()
    with lzma.open(root / "livedoor" / "livedoor.jsonl.xz", "wt", encoding="utf-8") as f:
        for i in range(20):
            body = "\n".join(_sentence(rng, f"記事{i}の") for _ in range(3))
            f.write(json.dumps({"label": f"cat{i % 2}", "title": f"記事{i}題", "body": body}, ensure_ascii=False))
            f.write("\n")
    jglue = root / "jglue"
    labels = ["entailment", "contradiction", "neutral"]
    for task, splits in (("jsts", ("train", "valid")), ("jcommonsenseqa", ("train", "valid")), ("jnli", ("valid",))):
        (jglue / task).mkdir(parents=True)
        for split in splits:
            rows = []
            for i in range(24):
                tag = f"{task}{split}{i}の"
                if task == "jcommonsenseqa":
                    row = {"question": _sentence(rng, tag), "label": i % 5}
                    row.update({f"choice{c}": rng.choice(WORDS) for c in range(5)})
                else:
                    label = float(i % 6) if task == "jsts" else labels[i % 3]
                    row = {"sentence1": _sentence(rng, tag), "sentence2": _sentence(rng, tag), "label": label}
                rows.append(row)
            (jglue / task / f"{split}.jsonl").write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            )
    (jglue / "jsquad").mkdir()
    articles = []
    for a in range(6):
        paragraphs = []
        for p in range(2):
            context = f"題{a} [SEP] 質問{a}_{p}の" + "".join(_sentence(rng, "") for _ in range(3))
            start = context.index("[SEP]") + 6
            answers = [{"text": context[start : start + 2], "answer_start": start}]
            qas = [{"id": f"{a}-{p}-{q}", "question": f"{rng.choice(WORDS)}は何か", "is_impossible": False,
                    "answers": answers} for q in range(2)]  # fmt: skip
            paragraphs.append({"context": context, "qas": qas})
        articles.append({"title": f"題{a}", "paragraphs": paragraphs})
    (jglue / "jsquad" / "valid.json").write_text(json.dumps({"version": "v2.0", "data": articles}, ensure_ascii=False))
    (root / "ja-wikipedia-ner").mkdir()
    ner = []
    for i in range(24):
        text = f"固有{i}の東京に{rng.choice(WORDS)}がある。"
        start = text.index("東京")
        ner.append({"text": text, "entities": [{"name": "東京", "span": [start, start + 2], "type": "地名"}]})
    (root / "ja-wikipedia-ner" / "ner.json").write_text(json.dumps(ner, ensure_ascii=False))


TINY = ["--hidden", "32", "--layers", "2", "--heads", "4", "--block", "32", "--batch", "4", "--steps", "2",
        "--eval-batches", "1", "--mlm-eval-blocks", "4", "--ft-train", "8", "--ft-eval", "4", "--heldout", "6",
        "--ft-epochs", "1", "--squad-eval-articles", "2", "--valid-fraction", "0.2", "--aozora-every", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ja-compare")
    _data_tree(root / "data", random.Random(0))
    args = [str(root / "work"), "--data", str(root / "data"), "--results", str(root / "results" / "cmp"), *TINY]
    return root, args, compare.main(args)


def test_corpus_holds_no_evaluation_row(run):
    root, _, _ = run
    text_dir = root / "work" / "text"
    corpus = (text_dir / "corpus.txt").read_text(encoding="utf-8")
    # every tagged sentence of an evaluation subset, and of the source splits only evaluation is drawn from
    for task in ("jnli", "jsts", "jcommonsenseqa"):
        for row in map(json.loads, (text_dir / f"{task}-eval.jsonl").read_text(encoding="utf-8").splitlines()):
            text = row.get("sentence1", row.get("question"))
            assert text not in corpus, (task, text)
    assert "jstsvalid" not in corpus and "jcommonsenseqavalid" not in corpus
    assert "jststrain" in corpus and "jnlivalid" in corpus  # training text is there, so the check can fail
    for row in json.loads((text_dir / "ner-eval.json").read_text(encoding="utf-8")):
        assert row["text"] not in corpus
    for article in json.loads((text_dir / "jsquad-eval.json").read_text(encoding="utf-8"))["data"]:
        for paragraph in article["paragraphs"]:
            assert paragraph["context"] not in corpus
    # livedoor: 8 of each category's 10 articles (the other 2 never read); aozora: every 2nd work
    assert len({w for w in range(20) if f"記事{w}題" in corpus}) == 16
    assert [w for w in range(12) if f"青空{w}の" in corpus] == list(range(0, 12, 2))


def test_one_budget_every_model_every_task(run):
    root, _, summary = run
    pre = summary["pretrain"]
    assert [pre[m]["objective"] for m in compare.MODELS] == ["mlm+nsp", "mlm", "rtd"]
    assert {pre[m]["sequence_slots"] for m in compare.MODELS} == {2 * 4 * 32}
    for m in compare.MODELS:  # tokens counted from the batches: packed MLM / RTD blocks are full, NSP pairs may not be
        assert 0 < pre[m]["tokens_seen"] <= 2 * 4 * 32
    assert pre["roberta"]["tokens_seen"] == pre["deberta"]["tokens_seen"] == 2 * 4 * 32
    configs = {m: json.loads((root / "work" / "pretrain" / m / "config.json").read_text()) for m in compare.MODELS}
    assert {c["hidden_size"] for c in configs.values()} == {32}
    assert {c["num_hidden_layers"] for c in configs.values()} == {2}
    assert configs["deberta"]["model_type"] == "deberta-v2" and configs["deberta"]["relative_attention"]
    # models without segment embeddings are saved with a tokenizer that emits none (a pair's second-segment ids
    # would index past RoBERTa's one-row table: the jnli fine-tuning below failed so before the fix)
    inputs = {m: json.loads((root / "work" / "pretrain" / m / "tokenizer_config.json").read_text())["model_input_names"]
              for m in compare.MODELS}  # fmt: skip
    assert "token_type_ids" in inputs["bert"]
    assert "token_type_ids" not in inputs["roberta"] and "token_type_ids" not in inputs["deberta"]
    generator = json.loads((root / "work" / "pretrain" / "deberta" / "generator" / "config.json").read_text())
    assert generator["num_hidden_layers"] == 1 and generator["hidden_size"] == 32  # half depth, same width
    for key in ("bert", "roberta", "deberta-generator", "shipped"):
        assert 0.0 <= summary["mlm"][key]["mlm_accuracy"] <= 1.0 and summary["mlm"][key]["masked_tokens"] > 0
    for m in (*compare.MODELS, compare.SCRATCH):
        for task in compare.TASKS:
            cell = summary["finetune"][m][task]
            assert math.isfinite(cell["value"]) and cell["wall_s"] > 0 and cell["cpu_s"] > 0, (m, task)
    saved = json.loads((root / "results" / "cmp.json").read_text())
    assert saved["finetune"]["deberta"]["jsquad"]["metric"] == "f1"
    table = (root / "results" / "cmp.md").read_text()
    assert "| jsquad | f1 |" in table and "| deberta | rtd |" in table
    assert "tokenizer: models/bunmyaku-bert-ja-small." in table


def test_scratch_control_is_bert_untrained(run):
    """The control column: BERT's shape at its seeded initialisation, pretrained on nothing; the pretrained BERT
    of the same shape moved away from such a start."""
    from bunmyaku.models.auto import from_pretrained

    root, _, summary = run
    work = root / "work" / "pretrain"
    assert summary["pretrain"]["scratch"]["tokens_seen"] == 0
    assert json.loads((work / "scratch" / "config.json").read_text())["model_type"] == "bert"
    scratch, bert = (from_pretrained(work / m, task="base").state_dict() for m in ("scratch", "bert"))
    assert scratch.keys() == bert.keys()
    assert not all(torch.equal(scratch[k], bert[k]) for k in scratch)
    layer_norm = "embed.norm.weight"
    assert torch.equal(scratch[layer_norm], torch.ones_like(scratch[layer_norm]))  # as initialised, never stepped
    assert "| scratch | none |" in (root / "results" / "cmp.md").read_text()


def test_rerun_reuses_finished_stages(run, monkeypatch):
    _, args, first = run

    def refuse(**_):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr("bunmyaku.pretrain", refuse)
    monkeypatch.setattr("bunmyaku.finetune", refuse)
    again = compare.main(args)
    assert again["finetune"] == first["finetune"] and again["pretrain"] == first["pretrain"]


def test_a_rerun_of_another_budget_reuses_nothing_stale(run, monkeypatch):
    """Other fine-tuning epochs fine-tune into their own folders; another pretraining budget in the same work folder
    is refused rather than reported with the old models."""
    root, args, first = run
    ran = []

    def fake_finetune(**options):
        ran.append((Path(options["output_dir"]).name, options["epochs"]))
        raise RuntimeError("stop after the first")

    monkeypatch.setattr("bunmyaku.finetune", fake_finetune)
    epochs = [*args[: args.index("--ft-epochs")], "--ft-epochs", "2", *args[args.index("--ft-epochs") + 2 :]]
    with pytest.raises(RuntimeError, match="stop after the first"):
        compare.main(epochs)
    assert ran == [("jnli-e2", 2.0)]  # the 1-epoch results stay where they are, not reused for 2 epochs
    steps = [*args[: args.index("--steps")], "--steps", "3", *args[args.index("--steps") + 2 :]]
    with pytest.raises(SystemExit, match="sequence slots"):
        compare.main(steps)
    assert first["started"] == json.loads((root / "results" / "cmp.json").read_text())["started"]


def test_recipes_are_the_shipped_ones_with_only_data_and_model_swapped(tmp_path):
    opts = compare.parse_args([str(tmp_path), *TINY])
    for task in compare.TASKS:
        recipe = (ROOT / "recipes" / "finetune" / f"ja-{task}.yaml").read_text()
        options = compare.finetune_options(task, tmp_path / "m", tmp_path, tmp_path / "out", opts)
        assert f"lr: {options['lr']}" in recipe.replace("2.0e-4", "0.0002")
        assert f"max_length: {options['max_length']}" in recipe and options["epochs"] == 1.0
        assert options["eval_split"] == options["test_split"] == 0.0
