"""The README cannot drift: every code block runs (or is marked as not run, with the reason), every printed claim
matches what it prints, every command parses with the CLI's own parser. The rules are in tests/readme_blocks.py."""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys

import pytest

import bunmyaku
from tests.conftest import ROOT, require_module
from tests.readme_blocks import (
    Block,
    ClaimFailed,
    blocks,
    check_command,
    commands,
    python_source,
    run,
)

README = ROOT / "README.md"
# the blocks that cannot run in a test (a GPU, torchrun, files the reader brings, minutes of training);
# adding one is a decision: raise this number in the same change, with the reason in its marker
NOT_RUN = 15


def readme_blocks() -> list[Block]:
    return blocks(README.read_text(encoding="utf-8"))


def test_the_readme_blocks_run_and_print_what_they_claim(tmp_path, minilm_dir, smollm2_gguf):
    """Every block not marked runs, in order, in a fresh folder where README paths such as models/ resolve."""
    for module in ("pandas", "transformers", "gguf", "fugashi"):
        require_module(module, "the README's examples")
    (tmp_path / "models").symlink_to(ROOT / "models")
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-m", "tests.readme_blocks", str(README)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    runnable = [b for b in readme_blocks() if b.not_run is None]
    assert f"README blocks run: {len(runnable)}" in done.stdout
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in (tmp_path / "my-classifier").iterdir()}


def test_every_command_parses_and_every_python_block_compiles():
    """Commands of every shell block, run or not: the verb exists and the CLI's parser accepts the flags and values."""
    found = readme_blocks()
    checked = 0
    for block in found:
        if block.lang == "python":
            compile(python_source(block), str(README), "exec")
            continue
        for line, argv in commands(block):
            try:
                check_command(argv)
            except ValueError as error:
                pytest.fail(f"README.md line {line}: {' '.join(argv)}: {error}")
            checked += 1
    assert checked >= 20, "the README's commands were not found"
    verbs = {argv[1] for b in found if b.lang == "shell" for _, argv in commands(b) if argv[0] == "bunmyaku"}
    assert {"finetune", "predict", "evaluate", "classify", "convert", "pretrain", "--version"} <= verbs


def test_blocks_that_do_not_run_say_why():
    skipped = [b for b in readme_blocks() if b.not_run is not None]
    assert all(len(b.not_run) >= 10 for b in skipped), [(b.line, b.not_run) for b in skipped]
    assert len(skipped) == NOT_RUN, [(b.line, b.not_run) for b in skipped]
    assert sum(b.not_run is None for b in readme_blocks()) >= 8


def test_the_checks_catch_a_broken_block(tmp_path, monkeypatch):
    """The rules themselves: a false claim, a failing command, an unknown flag, verb or value, a stray marker."""
    monkeypatch.chdir(tmp_path)
    fake = tmp_path / "README.md"
    fake.write_text("```python\nx = 2\nprint(x + 1)  # 3\nprint([x, 'a'])  # [2, ...]\n```\n")
    assert run(fake) == 1
    fake.write_text("text\n\n```python\nx = 2\nprint(x + 1)  # 4\n```\n")
    with pytest.raises(ClaimFailed, match=r"README.md line 5: printed '3', the README claims '4'"):
        run(fake)
    fake.write_text("```\nfalse\n```\n")
    with pytest.raises(RuntimeError, match="line 2: the shell block exited with 1"):
        run(fake)
    fake.write_text("<!-- not run: needs a GPU -->\n```\nfalse\n```\n")
    assert run(fake) == 0
    for argv, message in [
        (["bunmyaku", "finetune", "--learning-rate", "1"], "No such option: --learning-rate"),
        (["bunmyaku", "finetune", "--epochs", "many"], "Invalid value for '--epochs'"),
        (["bunmyaku", "classify", "text"], "--model"),
        (["bunmyaku", "tune", "--model", "x"], "no verb 'tune'"),
        (["make", "deploy"], "no target"),
        (["pip", "install", "x"], "unknown command"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            check_command(argv)
    check_command(["torchrun", "--nproc-per-node", "2", "-m", "bunmyaku", "pretrain", "--config", "r.yaml"])
    with pytest.raises(ValueError, match="right before a block"):
        blocks("<!-- not run: needs a GPU -->\ntext\n```\nls\n```\n")
    lines = commands(Block("shell", "bunmyaku a \\\n  --b c  # comment\n\nbunmyaku d\n", 10, None))
    assert lines == [(10, ["bunmyaku", "a", "--b", "c"]), (13, ["bunmyaku", "d"])]


def test_the_defaults_the_readme_names():
    """The fine-tuning defaults the README quotes are bunmyaku.finetune's."""
    quoted = re.search(r"with the same defaults \((.*?)\)", README.read_text(encoding="utf-8"), flags=re.S).group(1)
    pairs = re.findall(r"`(\w+)=([^`]+)`", quoted)
    parameters = inspect.signature(bunmyaku.finetune).parameters
    assert len(pairs) >= 4
    for name, value in pairs:
        assert parameters[name].default == ast.literal_eval(value), name


def test_public_names_resolve():
    """``from bunmyaku import *`` works and every name in ``__all__`` resolves and shows in ``dir()``."""
    code = "from bunmyaku import *; import bunmyaku; print(sorted(set(bunmyaku.__all__) - set(dir())))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    for name in bunmyaku.__all__:
        assert getattr(bunmyaku, name) is not None and name in dir(bunmyaku), name
    assert {"from_pretrained", "Tokenizer", "train_tokenizer", "pipeline", "finetune"} <= set(bunmyaku.__all__)


def test_readme_documents_the_hub_prefix():
    readme = README.read_text(encoding="utf-8")
    assert "hf://org/name" in readme
