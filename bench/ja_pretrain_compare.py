"""The talk's claim "DeBERTa-v3 > RoBERTa >= BERT", measured on Japanese on one budget (issue 17, item 6).

Three encoders of the same width and depth, pretrained on the same corpus with the same tokenizer for the same
number of steps x sequences x tokens per sequence, then fine-tuned with identical recipes on five Japanese tasks:

- ``bert``: BERT's objective, masked LM with static masks + next-sentence prediction (``--objective mlm+nsp``);
- ``roberta``: RoBERTa's, masked LM only, a fresh mask every epoch, full packed blocks (``--objective mlm``);
- ``deberta``: DeBERTa-v3's, a DeBERTa-v2 encoder as the discriminator of replaced token detection with
  gradient-disentangled embedding sharing (``--objective rtd``). Its generator (a masked LM of the same width
  and half the depth, as DeBERTa-v3's) is extra compute on top of the shared budget, and its wall time counts;
- ``scratch``, the control: ``bert``'s encoder randomly initialised (seeded), not pretrained, fine-tuned alike.

Usage: ``python -m bench.ja_pretrain_compare WORK_DIR [--steps N] [--ft-train N] ...`` (``--help`` lists the
budget's knobs). Stages write into ``WORK_DIR``: ``text/`` (the corpus and the fine-tuning subsets), ``tokens/``
(the token corpus), ``pretrain/<model>``, ``finetune/<model>/<task>``; a finished stage (its ``result.json``)
is reused on a rerun. The summary goes to ``bench/results/ja-pretrain-compare.json`` and ``.md`` (``--results``).

Data (``../shared/data`` or ``--data``), never an evaluation part of a downstream set in the pretraining text:

- every ``--aozora-every``-th work of ``aozora-150m`` (whole works, in corpus order, up to ``--aozora-chars``);
- modern text: the livedoor articles of a seeded 80/20 split per category (the 20% is never read), JSTS and
  JCommonsenseQA train sentences, and the training pools of the JNLI, JSQuAD and NER splits made here (their
  evaluation rows are drawn first, seeded, and left out of the corpus).

The tokenizer is the shipped ``models/bunmyaku-bert-ja-small``'s (MeCab + WordPiece, 32k), for all three models.
Held-out masked-LM accuracy is measured here, on the corpus's held-out documents, with the same masks for every
masked LM (BERT's, RoBERTa's, the RTD generator's, the shipped model's).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import lzma
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench import at_least
from bench.machine import describe
from bunmyaku.hub.files import write_json_atomic, write_jsonl_atomic, write_text_atomic
from bunmyaku.training.outputs import OutputDirBusy

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHIPPED = ROOT / "models" / "bunmyaku-bert-ja-small"
logger = logging.getLogger("ja-pretrain-compare")

MODELS = ("bert", "roberta", "deberta")
# the control: BERT's encoder of the same shape, randomly initialised and fine-tuned with the same recipes, so
# the table shows what each pretraining adds over none
SCRATCH = "scratch"
CHOICES = (*MODELS, SCRATCH)  # what --models takes, in table order
TASKS = ("jnli", "jsts", "jcommonsenseqa", "jsquad", "ner")
RECIPES = {task: ROOT / "recipes" / "finetune" / f"ja-{task}.yaml" for task in TASKS}
# the metric each task's table cell shows (bunmyaku's metrics.json keys)
METRICS = {"jnli": "accuracy", "jsts": "spearman", "jcommonsenseqa": "accuracy", "jsquad": "f1", "ner": "f1"}


# ------------------------------------------------------------------------------------------------
# text: the pretraining corpus and the fine-tuning subsets


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _aozora_works(path: Path) -> Iterator[list[str]]:
    """The works of aozora-150m (paragraph lists; a blank line separates works), streamed."""
    work: list[str] = []
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                work.append(line)
            elif work:
                yield work
                work = []
    if work:
        yield work


def _groups(sentences: list[str], size: int) -> list[str]:
    """Short sentences as documents of ``size`` consecutive sentences (one per line)."""
    return ["\n".join(sentences[i : i + size]) for i in range(0, len(sentences), size)]


def _split(rows: list[Any], eval_rows: int, seed: int) -> tuple[list[Any], list[Any]]:
    """(train pool, evaluation rows): ``eval_rows`` drawn at random (seeded), the rest kept in order."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:eval_rows])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def prepare_text(data: Path, out: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """Write ``out/corpus.txt`` (documents separated by blank lines) and ``out/<task>-{train,eval}.*`` (the
    fine-tuning subsets); returns the sizes. The evaluation rows of every task are drawn before the corpus is
    assembled, and only the training pools' text enters it."""
    seed, n_train, n_eval, n_held = opts.seed, opts.ft_train, opts.ft_eval, opts.heldout
    docs: list[str] = []
    sizes: dict[str, Any] = {}

    chars = works = 0
    for i, work in enumerate(_aozora_works(data / "aozora-150m" / "ja_corpus.txt.xz")):
        if i % opts.aozora_every:
            continue
        docs.append("\n".join(work))
        chars += sum(map(len, work))
        works += 1
        if chars >= opts.aozora_chars:
            break
    sizes["aozora"] = {"works": works, "chars": chars, "every": opts.aozora_every}

    with lzma.open(data / "livedoor" / "livedoor.jsonl.xz", "rt", encoding="utf-8") as f:
        articles = [json.loads(line) for line in f if line.strip()]
    by_label: dict[str, list[dict[str, Any]]] = {}
    for article in articles:
        by_label.setdefault(article["label"], []).append(article)
    kept = []
    for label in sorted(by_label):  # a seeded 80/20 split per category: the 20% is never read
        pool, _ = _split(by_label[label], len(by_label[label]) // 5, seed)
        kept += pool
    modern = ["\n".join([a["title"], *filter(None, (s.strip() for s in a["body"].splitlines()))]) for a in kept]
    modern = [d for d in modern if sum(map(len, d.splitlines())) > 0]
    livedoor_chars = 0
    for doc in modern:
        if livedoor_chars >= opts.livedoor_chars:
            break
        docs.append(doc)
        livedoor_chars += len(doc)
    sizes["livedoor"] = {"articles_in_pool": len(kept), "chars": livedoor_chars}

    jglue = data / "jglue"
    pair_fields = ("sentence1", "sentence2")
    # JSTS, JCommonsenseQA: train -> train subset (and corpus), valid -> eval subset
    for task, fields in (("jsts", pair_fields), ("jcommonsenseqa", ("question",))):
        train = _jsonl(jglue / task / "train.jsonl")
        valid = _jsonl(jglue / task / "valid.jsonl")
        docs += _groups([r[f] for r in train for f in fields], 20)
        _write_subset(out, task, train, valid, n_train, n_eval, seed)
        sizes[task] = {"pool": len(train), "eval_from": "valid"}
    # JNLI: only valid here; its evaluation rows are drawn first, the rest is the training pool
    pool, held = _split(_jsonl(jglue / "jnli" / "valid.jsonl"), n_held, seed)
    docs += _groups([r[f] for r in pool for f in pair_fields], 20)
    _write_subset(out, "jnli", pool, held, n_train, n_eval, seed)
    sizes["jnli"] = {"pool": len(pool), "eval_from": "valid (seeded draw)"}
    # NER: one file; evaluation sentences drawn first
    pool, held = _split(json.loads((data / "ja-wikipedia-ner" / "ner.json").read_text(encoding="utf-8")), n_held, seed)
    docs += _groups([r["text"] for r in pool], 20)
    _write_subset(out, "ner", pool, held, n_train, n_eval, seed)
    sizes["ner"] = {"pool": len(pool), "eval_from": "ner.json (seeded draw)"}
    # JSQuAD: only valid here; split by article (a context's questions stay together)
    squad = json.loads((jglue / "jsquad" / "valid.json").read_text(encoding="utf-8"))
    articles_pool, articles_held = _split(squad["data"], opts.squad_eval_articles, seed)
    docs += sorted({p["context"] for a in articles_pool for p in a["paragraphs"]})
    _write_squad(out, articles_pool, articles_held, n_train, n_eval, seed)
    sizes["jsquad"] = {"pool_articles": len(articles_pool), "eval_articles": len(articles_held)}

    # one paragraph or sentence per line, whitespace runs collapsed, no blank line inside a document
    docs = ["\n".join(filter(None, (" ".join(line.split()) for line in doc.splitlines()))) for doc in docs]
    write_text_atomic(out / "corpus.txt", "\n\n".join(d for d in docs if d) + "\n")
    sizes["corpus"] = {"documents": len(docs), "chars": sum(len(d) - d.count("\n") for d in docs)}
    return sizes


def _write_subset(out: Path, task: str, pool: list, held: list, n_train: int, n_eval: int, seed: int) -> None:
    rng = random.Random(seed)
    train = rng.sample(pool, min(n_train, len(pool)))
    evaluation = held[:n_eval] if len(held) <= n_eval else random.Random(seed + 1).sample(held, n_eval)
    if task == "ner":
        write_text_atomic(out / "ner-train.json", json.dumps(train, ensure_ascii=False))
        write_text_atomic(out / "ner-eval.json", json.dumps(evaluation, ensure_ascii=False))
    else:
        write_jsonl_atomic(out / f"{task}-train.jsonl", train)
        write_jsonl_atomic(out / f"{task}-eval.jsonl", evaluation)


def _write_squad(out: Path, pool: list, held: list, n_train: int, n_eval: int, seed: int) -> None:
    """SQuAD JSON subsets of about ``n_train`` / ``n_eval`` questions: whole paragraphs, drawn at random."""

    def take(articles: list, n: int, rng: random.Random) -> dict[str, Any]:
        paragraphs = [(a["title"], p) for a in articles for p in a["paragraphs"]]
        rng.shuffle(paragraphs)
        chosen: dict[str, list] = {}
        count = 0
        for title, paragraph in paragraphs:
            if count >= n:
                break
            chosen.setdefault(title, []).append(paragraph)
            count += len(paragraph["qas"])
        return {"version": "v2.0", "data": [{"title": t, "paragraphs": ps} for t, ps in chosen.items()]}

    write_text_atomic(
        out / "jsquad-train.json", json.dumps(take(pool, n_train, random.Random(seed)), ensure_ascii=False)
    )
    write_text_atomic(
        out / "jsquad-eval.json", json.dumps(take(held, n_eval, random.Random(seed + 1)), ensure_ascii=False)
    )


# ------------------------------------------------------------------------------------------------
# pretraining: one budget, three objectives


def model_configs(hidden: int, layers: int, heads: int, block: int) -> dict[str, dict[str, Any]]:
    """The three architectures at one width and depth (feed-forward 4x, dropout 0.1, HF field names)."""
    common = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 4 * hidden,
    }
    return {
        "bert": {"model_type": "bert", **common, "max_position_embeddings": 512, "type_vocab_size": 2},
        # RoBERTa counts positions from pad_token_id + 1: two more rows for the same 512 tokens
        "roberta": {"model_type": "roberta", **common, "max_position_embeddings": 514, "type_vocab_size": 1},
        # DeBERTa-v3's shape: relative positions only (log buckets), shared keys, no segment embeddings
        "deberta": {
            "model_type": "deberta-v2",
            **common,
            "max_position_embeddings": 512,
            "type_vocab_size": 0,
            "position_biased_input": False,
            "relative_attention": True,
            "position_buckets": min(256, block),
            "max_relative_positions": -1,
            "pos_att_type": ["p2c", "c2p"],
            "share_att_key": True,
            "norm_rel_ebd": "layer_norm",
            "layer_norm_eps": 1e-7,
        },
    }


OBJECTIVES = {
    "bert": {"objective": "mlm+nsp", "static_masking": True},
    "roberta": {"objective": "mlm", "static_masking": False},
    "deberta": {"objective": "rtd", "embedding_sharing": "gdes"},
}


def pretrain_model(name: str, tokens_dir: Path, out: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """Pretrain ``name`` into ``out`` (reused when its ``result.json`` exists); returns wall time and tokens seen."""
    done = out / "result.json"
    if done.is_file():
        summary = json.loads(done.read_text(encoding="utf-8"))
        slots = opts.steps * opts.batch * opts.block
        if summary["sequence_slots"] != slots:
            raise SystemExit(
                f"{out} holds a pretraining of {summary['sequence_slots']:,} sequence slots, not the {slots:,} of "
                f"--steps {opts.steps} --batch {opts.batch} --block {opts.block}: use another work folder"
            )
        return summary
    import bunmyaku
    from bunmyaku.training.rtd import base_model

    config = model_configs(opts.hidden, opts.layers, opts.heads, opts.block)[name]
    started, cpu = time.perf_counter(), time.process_time()
    result = bunmyaku.pretrain(
        **OBJECTIVES[name],
        model_config=config,
        tokenizer=str(opts.tokenizer),
        data=[str(tokens_dir)],
        block_size=opts.block,
        whole_word_masking=True,
        output_dir=str(out),
        max_steps=opts.steps,
        batch_size=opts.batch,
        lr=opts.lr,
        warmup_steps=max(1, opts.steps // 16),
        schedule="linear",
        min_lr_ratio=0.0,
        weight_decay=0.01,
        eval_every=opts.steps,
        eval_batches=opts.eval_batches,
        save_every=opts.steps,
        keep_last=1,
        seed=opts.seed,
        progress=False,
        plot=False,
    )
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    last = [r for r in records if "tokens_per_s" in r][-1]
    summary = {
        "model": name,
        "objective": OBJECTIVES[name]["objective"],
        "parameters": sum(p.numel() for p in base_model(result.model).parameters()),
        "wall_s": wall,
        "cpu_s": cpu,
        "train_s": last["elapsed_s"],
        "tokens_seen": round(last["tokens_per_s"] * last["elapsed_s"]),
        "sequence_slots": opts.steps * opts.batch * opts.block,
        "final_train_loss": last.get("loss"),
        "trainer_eval": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
    }
    write_json_atomic(done, summary, sort_keys=False)
    return summary


def scratch_model(out: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """Save ``bert``'s architecture, randomly initialised from ``--seed``, with the tokenizer into ``out``
    (reused when its ``result.json`` exists): the fine-tuning control, pretrained on nothing."""
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    from bunmyaku.models.auto import model_class
    from bunmyaku.tokenization import Tokenizer
    from bunmyaku.training.rtd import base_model

    tokenizer = Tokenizer.from_pretrained(opts.tokenizer)
    hf = {**model_configs(opts.hidden, opts.layers, opts.heads, opts.block)["bert"], "vocab_size": len(tokenizer)}
    hf["pad_token_id"] = tokenizer.pad_token_id
    cls = model_class("bert", "pretraining")  # as ``bert`` is saved: the pooler too
    torch.manual_seed(opts.seed)
    model = cls.from_config(cls.config_class.from_hf(hf))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = {
        "model": SCRATCH,
        "objective": "none",
        "parameters": sum(p.numel() for p in base_model(model).parameters()),
        "wall_s": 0.0,
        "cpu_s": 0.0,
        "tokens_seen": 0,
        "sequence_slots": 0,
    }
    write_json_atomic(done, summary, sort_keys=False)
    return summary


@torch.no_grad()
def mlm_accuracy(model_dir: Path, tokens_dir: Path, block: int, batch: int, max_blocks: int, seed: int) -> dict:
    """Masked-token accuracy of a masked LM on the corpus's held-out documents: packed blocks of ``block`` tokens,
    15% whole-word masks drawn once (seeded), the same for every model."""
    from bunmyaku.data import MaskingCollator, PackedBlocks, TokenCorpus, wordpiece_continuation
    from bunmyaku.models.auto import from_pretrained
    from bunmyaku.tokenization import Tokenizer

    tokenizer = Tokenizer.from_pretrained(model_dir)
    model = from_pretrained(model_dir, task="masked-lm", dtype=torch.float32).eval()
    valid = TokenCorpus(tokens_dir).split("valid")
    blocks = PackedBlocks(
        valid, block - 2, tokenizer.sep_token_id, prefix=[tokenizer.cls_token_id], suffix=[tokenizer.sep_token_id]
    )
    collator = MaskingCollator(
        vocab_size=len(tokenizer),
        mask_id=tokenizer.mask_token_id,
        pad_id=tokenizer.pad_token_id,
        special_ids=tokenizer.all_special_ids,
        whole_word=True,
        continuation=wordpiece_continuation(tokenizer.get_vocab(), len(tokenizer)),
        seed=seed,
    )
    masked_only = "masked_only" in inspect.signature(model.forward).parameters
    n = min(len(blocks), max_blocks)
    correct = total = 0
    for lo in range(0, n, batch):
        indices = list(range(lo, min(lo + batch, n)))
        inputs = collator([blocks[i] for i in indices], epoch=0, indices=indices)
        labels = inputs.pop("labels")
        inputs.pop("next_sentence_label", None)
        inputs.pop("token_type_ids", None)  # one segment: every model's default
        masked = labels != -100
        if masked_only:  # the vocabulary projection at the masked positions only: (M, V)
            predicted = model(**inputs, labels=labels, masked_only=True).logits.argmax(-1)
        else:
            predicted = model(**inputs).logits[masked].argmax(-1)
        correct += int((predicted == labels[masked]).sum())
        total += int(masked.sum())
    return {"mlm_accuracy": correct / total, "masked_tokens": total, "blocks": n}


# ------------------------------------------------------------------------------------------------
# fine-tuning: the recipes of recipes/finetune/ja-*.yaml on the subsets


def task_files(text_dir: Path, task: str) -> tuple[Path, Path]:
    suffix = {"jsquad": "json", "ner": "json"}.get(task, "jsonl")
    return text_dir / f"{task}-train.{suffix}", text_dir / f"{task}-eval.{suffix}"


def finetune_options(task: str, model_dir: Path, text_dir: Path, out: Path, opts: argparse.Namespace) -> dict:
    """The task's recipe with the model, the subset files and the output folder swapped in; every model gets
    the same options (``--ft-epochs`` replaces the recipe's epochs when given)."""
    from bunmyaku.training.recipe import load_recipe

    options = load_recipe(RECIPES[task])
    train, evaluation = task_files(text_dir, task)
    options.update(
        model=str(model_dir),
        train=str(train),
        eval=str(evaluation),
        eval_split=0.0,
        test_split=0.0,
        output_dir=str(out),
        seed=opts.seed,
        progress=False,
        plot=False,
    )
    if opts.ft_epochs:
        options["epochs"] = opts.ft_epochs
    return options


def finetune_model(task: str, model_dir: Path, text_dir: Path, out: Path, opts: argparse.Namespace) -> dict:
    """Fine-tune and evaluate (reused when ``result.json`` exists): the task's metric, the best epoch's metrics
    and the wall time."""
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    import bunmyaku

    started, cpu = time.perf_counter(), time.process_time()
    result = bunmyaku.finetune(**finetune_options(task, model_dir, text_dir, out, opts))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    summary = {
        "task": task,
        "metric": METRICS[task],
        "value": metrics.get(METRICS[task]),
        "wall_s": wall,
        "cpu_s": cpu,
        "metrics": metrics,
    }
    write_json_atomic(done, summary, sort_keys=False)
    for heavy in out.rglob("*.safetensors"):  # the table needs the metrics, not the fine-tuned weights
        heavy.unlink()
    return summary


# ------------------------------------------------------------------------------------------------
# the table


def _cell(value: float | None, metric: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if metric == "f1" and value > 1 else f"{value:.3f}"


def markdown(summary: dict[str, Any]) -> str:
    """The summary as the Markdown section BENCHMARKS.md quotes."""
    setup, pre, ft = summary["setup"], summary["pretrain"], summary["finetune"]
    models = [m for m in CHOICES if m in pre]
    lines = [
        "# BERT vs RoBERTa vs DeBERTa-v3 pretrained on Japanese, CPU budget (`python -m bench.ja_pretrain_compare`)",
        "",
        f"Machine: {summary['machine']}. Started {summary['started']}.",
        "",
        f"Encoder: {setup['layers']} layers x {setup['hidden']} wide, {setup['heads']} heads, feed-forward "
        f"{4 * setup['hidden']}; {setup['steps']} steps x {setup['batch']} sequences x {setup['block']} tokens, "
        f"AdamW lr {setup['lr']}, linear decay; tokenizer: {_shown(setup['tokenizer'])}.",
        "",
        "| model | objective | encoder parameters | tokens seen | pretraining wall (CPU) | held-out MLM accuracy |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for m in models:
        p = pre[m]
        mlm = summary["mlm"].get("deberta-generator" if m == "deberta" else m)
        acc = "n/a" if mlm is None else f"{mlm['mlm_accuracy']:.3f}" + (" (generator)" if m == "deberta" else "")
        cpu = f" ({p['cpu_s']:.0f} s)" if "cpu_s" in p else ""
        wall = f"{p['wall_s']:.0f} s{cpu}"
        lines.append(f"| {m} | {p['objective']} | {p['parameters']:,} | {p['tokens_seen']:,} | {wall} | {acc} |")
    shipped = summary["mlm"].get("shipped")
    if shipped:
        lines += [
            "",
            f"The shipped `models/bunmyaku-bert-ja-small` (4 x 256, 41M tokens seen) on the same held-out blocks and "
            f"masks ({shipped['masked_tokens']:,} masked tokens): MLM accuracy {shipped['mlm_accuracy']:.3f}.",
        ]
    lines += [
        "",
        "| task | metric | train / eval rows | " + " | ".join(models) + " |",
        "|---|---|---|" + "---:|" * len(models),
    ]
    for task in TASKS:
        cells = []
        for m in models:
            run = ft.get(m, {}).get(task)
            cells.append(f"{_cell(run['value'], run['metric'])} ({run['wall_s']:.0f} s)" if run else "not run")
        sizes = summary["finetune_sizes"].get(task, "")
        lines.append(f"| {task} | {METRICS[task]} | {sizes} | " + " | ".join(cells) + " |")
    epochs = f"{setup['ft_epochs']:g} epochs for every task" if setup.get("ft_epochs") else "the recipes' epochs"
    lines += [
        "",
        "Cells: the task's metric on the evaluation subset (best epoch), and the fine-tuning wall time. Fine-tuning: "
        f"`recipes/finetune/ja-*.yaml` with {epochs}.",
    ]
    return "\n".join(lines) + "\n"


def _shown(path: str) -> str:
    """A path relative to the repository when it is inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path


def cached_mlm_accuracy(model_dir: Path, tokens_dir: Path, opts: argparse.Namespace, cache: Path) -> dict:
    """:func:`mlm_accuracy`, reused from ``cache`` on a rerun."""
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    result = mlm_accuracy(model_dir, tokens_dir, opts.block, 8, opts.mlm_eval_blocks, opts.seed)
    write_json_atomic(cache, result, sort_keys=False)
    return result


def _rows(path: Path) -> int:
    if path.suffix == ".jsonl":
        return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, list):
        return len(data)
    return sum(len(p["qas"]) for a in data["data"] for p in a["paragraphs"])


# ------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_data = Path(os.environ.get("BUNMYAKU_DATA", ROOT.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--tokenizer", type=Path, default=SHIPPED)
    parser.add_argument("--results", type=Path, default=RESULTS / "ja-pretrain-compare", help="json / md stem")
    parser.add_argument("--models", default=",".join(CHOICES))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seed", type=int, default=0)
    # corpus
    parser.add_argument("--aozora-every", type=at_least(1), default=60, help="keep every Nth work of aozora-150m")
    parser.add_argument("--aozora-chars", type=int, default=3_000_000, help="stop after this many characters")
    parser.add_argument("--livedoor-chars", type=int, default=2_000_000, help="livedoor training articles, chars")
    parser.add_argument("--valid-fraction", type=float, default=0.02)
    # pretraining budget
    parser.add_argument("--hidden", type=at_least(1), default=128)
    parser.add_argument("--layers", type=at_least(1), default=4)
    parser.add_argument("--heads", type=at_least(1), default=2)
    parser.add_argument("--block", type=at_least(1), default=128)
    parser.add_argument("--batch", type=at_least(1), default=16)
    parser.add_argument("--steps", type=at_least(1), default=250)
    parser.add_argument("--lr", type=at_least(1e-12, float), default=1e-3)
    parser.add_argument("--eval-batches", type=at_least(1), default=4)
    parser.add_argument("--mlm-eval-blocks", type=at_least(1), default=200)
    # fine-tuning subsets
    parser.add_argument("--ft-train", type=at_least(1), default=400, help="training rows per task (JSQuAD: questions)")
    parser.add_argument("--ft-eval", type=at_least(1), default=300, help="evaluation rows per task")
    parser.add_argument("--ft-epochs", type=float, default=0.0, help="replaces the recipes' epochs when > 0")
    parser.add_argument("--heldout", type=at_least(1), default=500, help="JNLI / NER eval rows, kept out")
    parser.add_argument("--squad-eval-articles", type=at_least(1), default=12, help="JSQuAD articles held out")
    opts = parser.parse_args(argv)
    if opts.ft_eval > opts.heldout:
        parser.error(f"--ft-eval {opts.ft_eval} exceeds --heldout {opts.heldout}, the rows evaluation draws from")
    opts.model_list = [m for m in opts.models.split(",") if m]
    opts.task_list = [t for t in opts.tasks.split(",") if t]
    for name in opts.model_list:
        if name not in CHOICES:
            parser.error(f"--models: unknown model {name!r}; choose from {', '.join(CHOICES)}")
    for task in opts.task_list:
        if task not in TASKS:
            parser.error(f"--tasks: unknown task {task!r}; choose from {', '.join(TASKS)}")
    return opts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work: Path = opts.work_dir
    text_dir, tokens_dir = work / "text", work / "tokens"
    summary: dict[str, Any] = {
        "machine": describe(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "pretrain": {},
        "mlm": {},
        "finetune": {},
    }
    results_json = opts.results.with_suffix(".json")

    def save() -> None:
        write_json_atomic(results_json, summary, sort_keys=False)
        write_text_atomic(opts.results.with_suffix(".md"), markdown(summary))

    sizes_file = text_dir / "sizes.json"
    if not sizes_file.is_file():
        write_json_atomic(sizes_file, prepare_text(opts.data, text_dir, opts), sort_keys=False)
    # the run began with its first stage: a rerun into the same work folder (more models, the table again) keeps it
    summary["started"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(sizes_file.stat().st_mtime))
    summary["corpus"] = json.loads(sizes_file.read_text(encoding="utf-8"))
    summary["finetune_sizes"] = {
        t: " / ".join(f"{_rows(p):,}" for p in task_files(text_dir, t)) for t in opts.task_list
    }
    if not (tokens_dir / "index.json").is_file():
        from bunmyaku.data import build_corpus
        from bunmyaku.tokenization import Tokenizer

        started = time.perf_counter()
        build_corpus(
            [text_dir / "corpus.txt"],
            Tokenizer.from_pretrained(opts.tokenizer),
            tokens_dir,
            doc_split="blank",
            valid_fraction=opts.valid_fraction,
            seed=opts.seed,
            progress=False,
            workers=1,
        )
        logger.info("tokenized the corpus in %.0f s", time.perf_counter() - started)
    index = json.loads((tokens_dir / "index.json").read_text(encoding="utf-8"))
    summary["corpus"]["tokens"] = {k: v for k, v in index.items() if isinstance(v, (int, float, str))}

    for name in opts.model_list:
        logger.info("pretraining %s", name)
        out = work / "pretrain" / name
        summary["pretrain"][name] = (
            scratch_model(out, opts) if name == SCRATCH else pretrain_model(name, tokens_dir, out, opts)
        )
        save()
    eval_dirs = {"bert": "bert", "roberta": "roberta", "deberta-generator": "deberta/generator"}
    for key, sub in eval_dirs.items():
        folder = work / "pretrain" / sub
        if key.split("-")[0] in opts.model_list and (folder / "config.json").is_file():
            summary["mlm"][key] = cached_mlm_accuracy(folder, tokens_dir, opts, work / "mlm" / f"{key}.json")
    if opts.tokenizer.resolve() == SHIPPED.resolve():
        summary["mlm"]["shipped"] = cached_mlm_accuracy(SHIPPED, tokens_dir, opts, work / "mlm" / "shipped.json")
    save()
    # task by task, so that a partial table still compares the models; a run another process of this script holds
    # (two can share the fine-tuning, e.g. one with --tasks in reverse order) is taken up again once it is done
    pending = [(task, name) for task in opts.task_list for name in opts.model_list]
    while pending:
        busy = []
        for task, name in pending:
            logger.info("fine-tuning %s on %s", name, task)
            # an epochs override fine-tunes into its own folders: a finished run of other epochs is never reused
            folder = work / "finetune" / name / (f"{task}-e{opts.ft_epochs:g}" if opts.ft_epochs else task)
            try:
                run = finetune_model(task, work / "pretrain" / name, text_dir, folder, opts)
            except OutputDirBusy:
                busy.append((task, name))
                continue
            summary["finetune"].setdefault(name, {})[task] = run
            save()
        if busy == pending:
            time.sleep(30)
        pending = busy
    logger.info("\n%s", markdown(summary))
    return summary


if __name__ == "__main__":
    main()
