"""The talk's three demos, offline, on real models: fill-mask, text generation, sentence similarity.

Each demo returns plain data; the CLI (``bunmyaku demo``) prints it. A demo whose model is not
available says so and the others still run.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bunmyaku.hub.packaged import packaged_model

ROOT = Path(__file__).resolve().parents[1]
JA_BERT = ROOT / "models" / "bunmyaku-bert-ja-small"

SIMILARITY_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "A woman is playing the violin.",
    "A monkey is playing drums.",
]
SEARCH_CORPUS = [
    "The new movie is awesome.",
    "The cat sits outside.",
    "A man is playing guitar.",
    "The new movie is so great.",
    "A woman watches TV.",
    "Stock markets fell sharply after the rate rise.",
    "Transformers use attention to mix information across tokens.",
    "I love pasta with tomato sauce.",
]
SEARCH_QUERIES = ["Which film is good?", "How do neural networks for text work?", "What should I cook tonight?"]


@dataclass
class DemoResult:
    """One demo's outcome: its title, the model it used, and what to show (or why it was skipped)."""

    title: str
    model: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None
    seconds: float = 0.0


def similarity_demo(device: str | None = None) -> DemoResult:
    """Demo 3: cosine similarities between sentences, and semantic search, with all-MiniLM-L6-v2."""
    from bunmyaku.pipelines import pipeline

    path = packaged_model("all-MiniLM-L6-v2")
    result = DemoResult("Sentence similarity and semantic search (BERT bi-encoder)", f"all-MiniLM-L6-v2 ({path})")
    pipe = pipeline("sentence-similarity", model=path, device=device)
    matrix = pipe(SIMILARITY_SENTENCES)
    for i, sentence in enumerate(SIMILARITY_SENTENCES):
        row = {"sentence": sentence}
        row.update({f"s{j}": round(matrix[i][j], 3) for j in range(len(SIMILARITY_SENTENCES))})
        result.rows.append(row)
    for query, hits in zip(SEARCH_QUERIES, pipe.search(SEARCH_QUERIES, SEARCH_CORPUS, top_k=2), strict=True):
        result.rows.append({"query": query, "hits": [(h["text"], round(h["score"], 3)) for h in hits]})
    return result


def model_card_summary(folder: Path) -> str:
    """What the shipped model is, read from its own files: layers and width from config.json, the held-out
    MLM accuracy from its model card (README.md), so the demo never repeats a stale figure."""
    import json

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    parts = [f"{config['num_hidden_layers']} layers, width {config['hidden_size']}"]
    card = folder / "README.md"
    found = re.search(r"MLM accuracy ([\d.]+%)", card.read_text(encoding="utf-8")) if card.is_file() else None
    if found:
        parts.append(f"held-out MLM accuracy {found.group(1)}")
    return ", ".join(parts)


def fill_mask_demo(device: str | None = None) -> DemoResult:
    """Demo 1: Japanese fill-mask with the BERT that bunmyaku pretrained."""
    if not (JA_BERT / "config.json").is_file():
        return DemoResult(
            "Fill-mask in Japanese (BERT masked LM)",
            f"bunmyaku-bert-ja-small ({JA_BERT})",
            skipped=f"no model at {JA_BERT}: it ships in the repository's models/ folder (a source checkout)",
        )
    result = DemoResult(
        "Fill-mask in Japanese (BERT masked LM)",
        f"bunmyaku-bert-ja-small, pretrained by bunmyaku ({model_card_summary(JA_BERT)}) ({JA_BERT})",
    )
    from bunmyaku.pipelines import pipeline

    pipe = pipeline("fill-mask", model=JA_BERT, device=device)
    for text in ["吾輩は[MASK]である。", "私は学校[MASK]行きます。", "今日は天気が[MASK]。"]:
        result.rows.append({"text": text, "predictions": [(p["token_str"], round(p["score"], 3)) for p in pipe(text)]})
    return result


FEW_SHOT = (
    "Translate English to French:\n"
    "sea otter => loutre de mer\n"
    "peppermint => menthe poivrée\n"
    "plush giraffe => girafe en peluche\n"
    "cheese =>"
)
CHAT = [{"role": "user", "content": "In one sentence, what is attention in a Transformer?"}]


def generation_demo(device: str | None = None) -> DemoResult:
    """Demo 2: text generation and a few-shot prompt (GPT-3 style) with SmolLM2-135M-Instruct."""
    from bunmyaku.pipelines import pipeline

    path = packaged_model("SmolLM2-135M-Instruct")
    result = DemoResult("Text generation and few-shot prompting (GPT-style decoder)", f"SmolLM2-135M-Instruct ({path})")
    pipe = pipeline("text-generation", model=path, device=device)
    chat = pipe(CHAT, max_new_tokens=48, return_full_text=False)[0]["generated_text"]
    result.rows.append({"label": "chat (greedy, chat template)", "prompt": CHAT[0]["content"], "output": chat})
    few_shot = pipe(FEW_SHOT, max_new_tokens=8, stop=["\n"], return_full_text=False)[0]["generated_text"]
    result.rows.append(
        {
            "label": "few-shot English -> French (greedy, stop at newline; GPT-3 had 175B parameters, this model 135M)",
            "prompt": FEW_SHOT,
            "output": few_shot.strip(),
        }
    )
    sampled = pipe(
        "The best thing about learning a new language is",
        max_new_tokens=24,
        do_sample=True,
        temperature=0.8,
        top_p=0.9,
        repetition_penalty=1.2,
        seed=0,
        return_full_text=False,
    )[0]["generated_text"]
    result.rows.append(
        {
            "label": "sampling (temperature 0.8, top-p 0.9, repetition penalty 1.2, seed 0)",
            "prompt": "The best thing about learning a new language is",
            "output": sampled,
        }
    )
    return result


DEMOS: list[Callable[[str | None], DemoResult]] = [fill_mask_demo, generation_demo, similarity_demo]


def run_demos(device: str | None = None) -> list[DemoResult]:
    """Run every demo; a missing model turns into a skipped result, never a crash."""
    results = []
    for demo in DEMOS:
        start = time.perf_counter()
        try:
            result = demo(device)
        except (FileNotFoundError, ImportError) as e:
            result = DemoResult(demo.__doc__.split(":")[1].strip(), "-", skipped=str(e))
        result.seconds = time.perf_counter() - start
        results.append(result)
    return results
