"""The README's Python example runs as written and prints what it claims."""

from __future__ import annotations

import contextlib
import io
import re

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
