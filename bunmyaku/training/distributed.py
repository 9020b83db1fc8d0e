"""Data-parallel helpers: process-group set-up from ``torchrun``'s variables, rank queries, reductions.

Library code asks ``torch.distributed`` whether a group exists; only the entry point (the CLI, a test)
reads the environment, through :func:`init_from_env`.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import importlib
import os
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


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
    # torch.distributed.nn.functional binds `group=group.WORLD` as its functions' default when it is first imported
    # (by DistributedDataParallel's import chain, among others); imported after the group exists, those defaults hold
    # the group, so destroy_process_group cannot free it and its gloo threads run on into the interpreter's
    # shutdown (see process_group_from_env)
    importlib.import_module("torch.distributed.nn.functional")

    dist.init_process_group(backend)
    return True


@contextlib.contextmanager
def process_group_from_env(backend: str | None = None) -> Iterator[bool]:
    """:func:`init_from_env` for the duration of a block; the group it joined is destroyed when the block ends,
    normally or by an exception.

    Why the group must be gone before the interpreter shuts down: gloo's worker threads free each finished
    collective, and freeing a tensor that Python also referenced takes the GIL. A worker that does this while the
    interpreter finalizes is ended inside a C++ destructor, and the process aborts with SIGABRT ("terminate called
    without an active exception"; in a core dump: ``~AsyncBarrierWork`` -> ``~AsyncAllgatherWork`` ->
    ``decref_pyobject`` -> ``take_gil`` -> ``pthread_exit``). Those threads end only when the group is freed, and
    ``destroy_process_group`` frees it only when nothing else holds it: :func:`init_from_env` and ``_destroy`` see
    to that. On an error, destroying the group also closes the connections, so the other processes fail instead of
    waiting in a collective.

    Yields:
        Whether a process group is active.
    """
    created = not dist.is_initialized() and init_from_env(backend)
    try:
        yield dist.is_initialized()
        if created and dist.is_initialized():
            # leave together: a peer still in its last collective must not lose its connections under it
            dist.barrier()
    finally:
        if created and dist.is_initialized():
            _destroy()


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
    _destroy()


def _destroy() -> None:
    """``destroy_process_group``, then let go of what still holds the groups, so that they are freed (and gloo's
    threads joined) now, while the interpreter is whole (see :func:`process_group_from_env`)."""
    dist.destroy_process_group()
    gc.collect()  # the run's modules and optimizer states, which hold meshes, in reference cycles
    # torch's DTensor caches (sharding propagation, redistribution plans, mesh topology) keep the device meshes of a
    # sharded run after it has ended, and each mesh's registry holds its groups; the groups are destroyed, so the
    # meshes are of no further use
    for obj in gc.get_objects():
        if isinstance(obj, DeviceMesh) and isinstance(getattr(obj, "_pg_registry", None), dict):
            obj._pg_registry.clear()


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
