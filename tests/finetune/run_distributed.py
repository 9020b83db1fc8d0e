"""Tiny fine-tuning and cv runs under torchrun: tests/finetune/test_distributed_finetune.py starts it.

Usage: ``python -m torch.distributed.run --nproc-per-node 2 -m tests.finetune.run_distributed OUT two`` (batch 4 per
process), then ``python -m tests.finetune.run_distributed OUT one`` (batch 8 in one process: the same global batch).
Each mode writes ``OUT/<mode>/fsdp/`` (``bunmyaku.finetune``, strategy fsdp), ``OUT/<mode>/ddp/`` (the
``bunmyaku finetune`` command, strategy ddp) and ``OUT/<mode>/cv/`` (``bunmyaku.cv``, 2 folds); ``OUT/tiny/`` is
the model (written by ``one``, which runs first).

The first ``bunmyaku.finetune`` call joins the process group itself (nothing here initialises it), as in a user's
script launched by torchrun; the later calls and the command find it joined. Each process records the result
files it wrote itself in ``OUT/<mode>/writes-rank<r>.json``: the atomic writers of the fine-tuning and cv modules
are wrapped to log their paths.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

from tests.finetune.helpers import save_tiny, sentiment_rows
from tests.training.helpers import fail_if_group_outlived

KEPT: list = []  # the results of main's calls, alive when the process group is destroyed at exit

SETTINGS = {
    "task": "text-classification",
    "epochs": 2,
    "lr": 3e-3,
    "warmup_ratio": 0.0,
    "warmup_steps": 0,
    "schedule": "constant",
    "log_every": 1000,
    "progress": False,
    "plot": False,
    "device": "cpu",
}


def tiny_model(out: Path) -> Path:
    """The tiny BERT without dropout: each process draws its own dropout masks, one process draws others."""
    directory = out / "tiny"
    if not (directory / "config.json").is_file():
        save_tiny(directory)
        config = json.loads((directory / "config.json").read_text())
        config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def rows(n: int, seed: int) -> list[dict]:
    return [{"text": t, "label": y} for t, y in sentiment_rows(n, seed=seed)]


def record_writes(path: Path) -> None:
    """Wrap the result writers of the fine-tuning and cv modules so that each call's path is logged in ``path``."""
    import bunmyaku.tasks.cv as cv_module
    import bunmyaku.tasks.finetune as finetune_module

    written: list[str] = []

    def wrap(module, name):
        original = getattr(module, name)

        def logged(target, *args, **kwargs):
            written.append(str(target))
            path.write_text(json.dumps(written))
            return original(target, *args, **kwargs)

        setattr(module, name, logged)

    for module in (finetune_module, cv_module):
        for name in ("write_json_atomic", "write_jsonl_atomic", "write_text_atomic"):
            if hasattr(module, name):
                wrap(module, name)
    path.write_text(json.dumps(written))


def cli(here: Path, model: str, train: list[dict], evaluation: list[dict], batch: int) -> None:
    """``bunmyaku finetune`` (strategy ddp) in this process, as ``torchrun -m bunmyaku finetune`` runs it."""
    from bunmyaku.cli import app

    files = {}
    for name, data in (("train", train), ("eval", evaluation)):
        files[name] = here / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in data))
    options = {**SETTINGS, "batch_size": batch, "eval_batch_size": 5, "strategy": "ddp", "model": model}
    args = ["finetune", "--train", files["train"], "--eval", files["eval"], "--output-dir", here / "ddp"]
    for key, value in options.items():
        if isinstance(value, bool):
            args.append(f"--{'' if value else 'no-'}{key.replace('_', '-')}")
        else:
            args += [f"--{key.replace('_', '-')}", value]
    app([str(a) for a in args], standalone_mode=False)


def main() -> None:
    import faulthandler

    faulthandler.dump_traceback_later(200, exit=True)  # a hung collective fails the run instead of the test's timeout
    # registered before the first call joins the group, so it runs after the hook that destroys it
    atexit.register(fail_if_group_outlived)
    import bunmyaku

    out, mode = Path(sys.argv[1]), sys.argv[2]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = 8 // world
    here = out / mode
    here.mkdir(parents=True, exist_ok=True)
    record_writes(here / f"writes-rank{os.environ.get('RANK', '0')}.json")
    model = str(tiny_model(out))
    # 43 rows: global batches of 8 and a last one of 3, which 2 processes share unequally (2 + 1)
    train, evaluation = rows(43, seed=0), rows(13, seed=1)
    # a script's calls: the first joins the group, which stays for the next ones (the command finds it joined:
    # creating the default group again in the same processes after destroying it is not reliable)
    result = bunmyaku.finetune(
        model=model,
        train=train,
        eval=evaluation,
        batch_size=batch,
        eval_batch_size=5,
        strategy="fsdp",
        output_dir=here / "fsdp",
        **SETTINGS,
    )
    cli(here, model, train, evaluation, batch)
    cv = bunmyaku.cv(model=model, train=train, folds=2, batch_size=batch, output_dir=here / "cv", **SETTINGS)
    KEPT.extend([result, cv])  # held until exit, as a script's globals are: they must not hold the process group


if __name__ == "__main__":
    main()
