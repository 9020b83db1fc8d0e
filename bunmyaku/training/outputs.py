"""Output folders that one run owns: an exclusive lock, so two runs never write into the same folder at once.

A run takes ``<output_dir>/.bunmyaku.lock`` with ``fcntl.flock`` for as long as it writes there. The lock is
released by the operating system when the process ends, however it ends (``kill -9`` included), so a stale
lock file never blocks the next run: only a live process holds the lock.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".bunmyaku.lock"


class OutputDirBusy(RuntimeError):
    """Another live process is writing into the output folder."""


@contextlib.contextmanager
def exclusive_output_dir(directory: str | os.PathLike) -> Iterator[Path]:
    """Create ``directory`` if needed and hold its lock for the duration of the block.

    Raises:
        NotADirectoryError: ``directory`` exists and is not a folder.
        OutputDirBusy: another process holds the lock (another run is writing there now).
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"output folder {directory} exists and is not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock(fd, directory)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield directory
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _lock(fd: int, directory: Path) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; a single user's runs are trusted not to collide
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        raise OutputDirBusy(
            f"another bunmyaku run (pid {holder}) is writing into {directory}; wait for it to finish "
            "or choose another --output-dir"
        ) from None


def is_locked(directory: str | os.PathLike) -> bool:
    """Whether a live process holds ``directory``'s lock (for tests and tools; racy by nature)."""
    path = Path(directory) / LOCK_NAME
    if not path.exists():
        return False
    try:
        with exclusive_output_dir(directory):
            return False
    except OutputDirBusy:
        return True
