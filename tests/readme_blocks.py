"""The README's code blocks as a reader meets them, and a runner that executes them.

Rules the README follows (``tests/test_readme.py`` enforces them):

- A ```` ```python ```` block runs. The python blocks share one namespace, in README order, as a reader's session
  would (a later block uses names an earlier one made); they run in a fresh temporary folder, offline.
- In a python block, ``print(...)  # EXPECTED`` is a claim: the text printed must match EXPECTED, where ``...``
  matches anything (doctest's ELLIPSIS). A print without such a comment claims nothing.
- A ```` ``` ```` / ```` ```bash ```` block holds commands. It runs with bash (``set -e``) in the same folder, in
  README order among the python blocks, and every command in it is checked against the CLI: ``bunmyaku VERB``
  exists and parses its flags and values (``torchrun ... -m bunmyaku VERB ...`` likewise), ``make TARGET`` names a
  Makefile target.
- ``<!-- not run: REASON -->`` on the line before a block marks one that cannot run here (a GPU, torchrun, files the
  reader brings, minutes of work). Its commands are still checked; a python block is still compiled.

``python -m tests.readme_blocks [README.md]`` runs the blocks in the current folder and exits non-zero with the
README line of the first failure.
"""

from __future__ import annotations

import doctest
import io
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*not run:(.*?)-->\s*$")
CLAIM = re.compile(r"^(\s*)print\((.*)\)\s+#\s?(.*)$")
SHELL = {"", "bash", "sh", "shell", "console"}


@dataclass
class Block:
    """One fenced block: its language ("python" or "shell"), code, the README line of its first code line, and the
    not-run reason (None: it runs)."""

    lang: str
    code: str
    line: int
    not_run: str | None


def blocks(text: str) -> list[Block]:
    """The fenced blocks of a markdown text, in order, with their not-run markers.

    Raises:
        ValueError: a marker without a block right after it, a block of another language, an unclosed fence.
    """
    found: list[Block] = []
    lines = text.splitlines()
    pending: tuple[int, str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = MARKER.match(line.strip())
        fence = FENCE.match(line)
        if marker:
            pending = (i + 1, marker.group(1).strip())
        elif fence:
            lang = fence.group(1).lower()
            if lang not in SHELL and lang != "python":
                raise ValueError(f"README.md line {i + 1}: a ```{lang} block; only python and shell blocks are run")
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                raise ValueError(f"README.md line {i + 1}: the block is never closed")
            code = "\n".join(lines[i + 1 : end]) + "\n"
            found.append(Block("python" if lang == "python" else "shell", code, i + 2, pending[1] if pending else None))
            pending = None
            i = end
        elif pending and line.strip():
            raise ValueError(f"README.md line {pending[0]}: a not-run marker must come right before a block")
        i += 1
    if pending:
        raise ValueError(f"README.md line {pending[0]}: a not-run marker must come right before a block")
    return found


def commands(block: Block) -> list[tuple[int, list[str]]]:
    """(README line, argv) for each command of a shell block: continuations joined, comments dropped."""
    out = []
    joined, start = "", None
    for offset, line in enumerate(block.code.splitlines()):
        if start is None:
            start = block.line + offset
        joined += line.rstrip().removesuffix("\\") + " "
        if line.rstrip().endswith("\\"):
            continue
        argv = shlex.split(joined, comments=True)
        if argv:
            out.append((start, argv))
        joined, start = "", None
    return out


def check_command(argv: list[str], makefile: Path = ROOT / "Makefile") -> None:
    """Raise ValueError unless ``argv`` is a command the project has, with flags and values its parser accepts."""
    if argv[0] == "make":
        targets = set(re.findall(r"^([\w.-]+):", makefile.read_text(encoding="utf-8"), flags=re.M))
        missing = [t for t in argv[1:] if not t.startswith("-") and t not in targets]
        if missing:
            raise ValueError(f"make: no target {missing} in {makefile.name}")
        return
    if argv[0] == "torchrun":
        if "-m" not in argv or argv[argv.index("-m") + 1] != "bunmyaku":
            raise ValueError("a torchrun command must run `-m bunmyaku VERB ...`")
        argv = argv[argv.index("-m") + 1 :]
    if argv[0] != "bunmyaku":
        raise ValueError(f"unknown command {argv[0]!r}: README commands are bunmyaku, torchrun -m bunmyaku, make")
    check_bunmyaku(argv[1:])


def check_bunmyaku(args: list[str]) -> None:
    """Parse ``bunmyaku ARGS`` with the CLI's own parser (types, choices, required options), without running it."""
    import typer

    from bunmyaku.cli import app

    group = typer.main.get_command(app)
    while args and args[0] in ("--debug", "--no-debug"):
        args = args[1:]
    if not args or args[0] in ("--version", "--help"):
        return
    verb, rest = args[0], args[1:]
    if verb not in group.commands:
        raise ValueError(f"bunmyaku has no verb {verb!r} (it has {sorted(group.commands)})")
    if "--help" in rest:
        rest = [a for a in rest if a != "--help"]
    try:
        group.commands[verb].make_context(verb, rest)
    except Exception as error:  # the parser's UsageError / BadParameter (typer vendors click's exceptions)
        message = error.format_message() if hasattr(error, "format_message") else str(error)
        raise ValueError(f"bunmyaku {verb}: {message}") from None


class ClaimFailed(AssertionError):
    """A README print did not print what its comment claims."""


def python_source(block: Block) -> str:
    """The block's code with each claimed print made a checked print, padded so that line numbers are README's."""
    out = []
    for offset, line in enumerate(block.code.splitlines()):
        claim = CLAIM.match(line)
        if claim:
            indent, args, expected = claim.groups()
            line = f"{indent}__readme_claim__({block.line + offset}, {expected!r}, {args})"
        out.append(line)
    return "\n" * (block.line - 1) + "\n".join(out) + "\n"


def readme_claim(line: int, expected: str, *args, **kwargs) -> None:
    """print(*args, **kwargs), then check the text printed against the README's claim."""
    buffer = io.StringIO()
    print(*args, **kwargs, file=buffer)
    printed = buffer.getvalue()
    sys.stdout.write(printed)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    if not doctest.OutputChecker().check_output(expected + "\n", printed, flags):
        raise ClaimFailed(f"README.md line {line}: printed {printed.strip()!r}, the README claims {expected!r}")


def run(readme: Path) -> int:
    """Run the README's blocks in the current folder, in order; returns how many ran."""
    namespace = {"__name__": "__readme__", "__readme_claim__": readme_claim}
    ran = 0
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for block in blocks(readme.read_text(encoding="utf-8")):
        started = time.perf_counter()
        if block.lang == "python":
            code = compile(python_source(block), str(readme), "exec")
            if block.not_run is None:
                print(f"--- README.md line {block.line}: python", flush=True)
                exec(code, namespace)
                ran += 1
        elif block.not_run is None:
            print(f"--- README.md line {block.line}: shell", flush=True)
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], env=env)
            if done.returncode:
                raise RuntimeError(f"README.md line {block.line}: the shell block exited with {done.returncode}")
            ran += 1
        if block.not_run is None:
            print(f"\n--- README.md line {block.line}: {time.perf_counter() - started:.1f} s", flush=True)
    return ran


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "README.md"
    print(f"README blocks run: {run(path)}")
