"""Data-parallel helpers: process-group set-up from ``torchrun``'s variables, rank queries, reductions.

Library code asks ``torch.distributed`` whether a group exists; only the entry point (the CLI, a test)
reads the environment, through :func:`init_from_env`.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1); returns whether one was joined.

    Args:
        backend: ``"gloo"``, ``"nccl"`` or a per-device list; default with CUDA: NCCL for CUDA tensors and gloo for
            CPU ones (``"cpu:gloo,cuda:nccl"``: under FSDP's CPU offload the shards, their gradients and the norms
            taken over them live in host memory, which NCCL cannot reduce), else gloo.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if "nccl" in backend:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


@contextlib.contextmanager
def process_group_from_env(backend: str | None = None) -> Iterator[bool]:
    """:func:`init_from_env` for the duration of a block; the group it joined is destroyed when the block ends,
    normally or by an exception.

    A group still alive when the interpreter shuts down is destroyed after it: gloo's worker threads may then
    need the GIL that no longer exists, and the process aborts with SIGABRT ("terminate called without an
    active exception"; see the note in ``torch.distributed.destroy_process_group``). Destroying the group while
    the interpreter is whole avoids that; on an error it also closes the connections, so the other processes
    fail instead of waiting in a collective.

    Yields:
        Whether a process group is active.
    """
    created = not dist.is_initialized() and init_from_env(backend)
    try:
        yield dist.is_initialized()
        if created and dist.is_initialized():
            # leave together: a process that tears its connections down while a peer's last collective is still
            # in flight aborts in gloo's threads the same way (seen once in CI with `generate --tp 2`)
            dist.barrier()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def join_from_env(backend: str | None = None) -> bool:
    """:func:`init_from_env` for the rest of the process, for library entry points a user's script calls (perhaps
    several times) under ``torchrun``: the group is joined once, kept for the next call, and destroyed at exit
    (an ``atexit`` hook, which runs while the interpreter is whole; see :func:`process_group_from_env`). Joining
    once also avoids creating the default group again after a sharded run, which the rendezvous does not survive.

    Returns:
        Whether a process group is active.
    """
    if not dist.is_initialized() and init_from_env(backend):
        atexit.register(_leave)
    return dist.is_initialized()


def _leave() -> None:
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        # leave together, as process_group_from_env does: a process whose peer is still finishing (process 0
        # writing a cv run's results) must not tear its connections down under it; at exit an error on one
        # process may have ended the others' work, so the wait is bounded and a timeout only skips it
        with contextlib.suppress(RuntimeError):
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    dist.destroy_process_group()


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's index (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process logs and saves."""
    return rank() == 0


def all_reduce_sums(values: Mapping[str, float | torch.Tensor], device: torch.device) -> dict[str, float]:
    """Sum each value over processes (one collective for all of them); returns plain floats."""
    keys = sorted(values)
    if not dist.is_initialized():  # one process: nothing to sum, and host numbers need no device round trip
        return {k: float(values[k]) for k in keys}
    flat = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).to(device).reshape(()) for k in keys])
    dist.all_reduce(flat)
    return dict(zip(keys, flat.tolist(), strict=True))


def gather_objects(obj: object) -> list[object]:
    """Every process's ``obj``, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()
