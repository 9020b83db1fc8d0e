"""The README's Python example runs as written and prints what it claims; the public names it uses exist."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys

import bunmyaku
from tests.conftest import ROOT


def test_readme_minilm_example_runs(minilm_dir):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = next(b for b in blocks if "cosine similarity" in b)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example, "README.md", "exec"), {})
    claimed = re.search(r"# (\d\.\d+)", example).group(1)
    printed = re.search(r"cosine similarity: (\d\.\d+)", out.getvalue()).group(1)
    assert printed == claimed


def test_public_names_resolve():
    """``from bunmyaku import *`` works and every name in ``__all__`` resolves and shows in ``dir()``."""
    code = "from bunmyaku import *; import bunmyaku; print(sorted(set(bunmyaku.__all__) - set(dir())))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    for name in bunmyaku.__all__:
        assert getattr(bunmyaku, name) is not None and name in dir(bunmyaku), name
    assert {"from_pretrained", "Tokenizer", "train_tokenizer", "pipeline"} <= set(bunmyaku.__all__)


def test_readme_documents_the_hub_prefix():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "hf://org/name" in readme
