"""Assemble the Japanese pretraining corpus: one document per line, every ``test`` split left out.

Sources (../shared/data or $BUNMYAKU_DATA): the Aozora Bunko texts (a paragraph per line), the sentences
of JGLUE's train / valid splits (JSTS, JNLI, JCommonsenseQA questions), ja-wikipedia-ner sentences and
the JSQuAD valid contexts (deduplicated). Run from the repository root:

    python recipes/pretrain/ja_corpus.py runs/ja-corpus/ja.txt
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def documents(data: Path):
    for path in sorted((data / "aozora").glob("*.txt")):
        yield from path.read_text(encoding="utf-8").splitlines()
    for name, fields in [
        ("jsts", ("sentence1", "sentence2")),
        ("jnli", ("sentence1", "sentence2")),
        ("jcommonsenseqa", ("question",)),
    ]:
        for split in ("train", "valid"):  # never test
            path = data / "jglue" / name / f"{split}.jsonl"
            if path.exists():
                for line in path.read_text(encoding="utf-8").splitlines():
                    record = json.loads(line)
                    yield from (record[f] for f in fields)
    for record in json.loads((data / "ja-wikipedia-ner" / "ner.json").read_text(encoding="utf-8")):
        yield record["text"]
    squad = json.loads((data / "jglue" / "jsquad" / "valid.json").read_text(encoding="utf-8"))
    yield from {p["context"] for article in squad["data"] for p in article["paragraphs"]}


def main(out: str) -> None:
    data = Path(os.environ.get("BUNMYAKU_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
    seen, lines = set(), []
    for doc in documents(data):
        doc = " ".join(doc.split())
        if doc and doc not in seen:
            seen.add(doc)
            lines.append(doc)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(f"{len(lines):,} documents, {sum(map(len, lines)):,} characters -> {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/ja-corpus/ja.txt")
