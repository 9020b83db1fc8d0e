"""Sharded data parallelism on PyTorch's own engines: FSDP2 (``fully_shard``) and its checkpoints (DCP).

``--strategy fsdp`` shards every parameter, its gradient and its optimizer state over the processes (ZeRO-3):
each Transformer block is one ``fully_shard`` unit (its weights are all-gathered just before its forward and
backward and freed after), then the root takes the rest (embeddings, final norm, heads). ``--strategy hsdp``
shards within groups of ``shard_size`` processes (the GPUs of a node) and replicates across groups, on a 2-D
device mesh ``(replicate, shard)``: the gradients are reduce-scattered inside a node and all-reduced between
nodes. ``ddp`` (the default) stays with :class:`~torch.nn.parallel.DistributedDataParallel`.

What the Trainer asks of this module, and why:

- gradient accumulation: no reduce-scatter on the non-final micro-batches of a step
  (:func:`set_gradient_sync`), as ``no_sync`` does for DDP;
- clipping: ``clip_grad_norm_`` over DTensor gradients already returns the norm over all shards;
- evaluation: processes may hold different numbers of held-out batches, while a sharded forward is a
  collective; :func:`gathered` all-gathers the weights once, so evaluation forwards need no communication;
- checkpoints: every process writes its own shards of the model and optimizer state with
  ``torch.distributed.checkpoint`` (DCP), and any number of processes reads them back (resharding);
- export: the full weights are gathered on rank 0 and written as one ordinary HF folder;
- plugins: every parameter and gradient is a DTensor, so EMA's and SWA's averages (clones of the parameters) are
  sharded alike and updated shard by shard, FGM's, AWP's and SAM's norms are taken over every shard
  (:func:`global_norm`) while their perturbations are applied shard by shard, and the plugins' tensors travel
  through DCP with the model (:func:`split_plugin_states`). Tensor parallelism's split weights are DTensors too.

Checkpoint files: DCP's default ``FileSystemWriter`` pickles its ``.metadata`` file and loads it with a plain
``pickle.load``, and stores non-tensor values with ``torch.save``. bunmyaku writes no pickle: the shards are
safetensors files (DCP's ``HuggingFaceStorageWriter`` in distributed mode, whose header records each chunk's
offset, so the reader rebuilds the metadata from the headers and no ``.metadata`` file exists), only tensors
go through DCP, and everything else (step, scheduler, optimizer hyper-parameters, RNG states, data position)
goes to ``trainer_state.json`` / ``trainer_state.safetensors`` as for unsharded checkpoints. A checkpoint is
written under a temporary name and renamed when every process has finished, so a killed save leaves the
previous checkpoint the newest complete one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bunmyaku.training import checkpoint as ckpt
from bunmyaku.training import distributed as dist_utils

logger = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp", "hsdp")
SHARDS = "shards"  # the DCP folder inside a checkpoint


# plugins that take norms over every shard (a collective on the gradients' device): with cpu_offload the shards are in
# host memory, which the NCCL process group of a CUDA run cannot reduce (PyTorch's own clipping meets the same limit)
_NEEDS_DEVICE_SHARDS = ("FGM", "AWP", "SAM")


def check_strategy(args: Any, plugins: Sequence[object], device: torch.device) -> None:
    """Refuse settings a sharded run cannot honour, with the reason.

    Every plugin of bunmyaku runs on sharded weights (EMA and SWA keep their averages sharded like the parameters,
    FGM, AWP and SAM take their norms over every shard: see :func:`global_norm`), except FGM, AWP and SAM with
    ``cpu_offload`` (their norms would reduce host-memory shards over NCCL).

    Raises:
        ValueError: an unknown strategy, ``cpu_offload`` without CUDA, without sharding or with FGM / AWP / SAM, a bad
            ``shard_size``.
    """
    if args.strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {args.strategy!r}")
    if args.shard_size < 0:
        raise ValueError(f"shard_size must be >= 0 (0: the GPUs of one node), got {args.shard_size}")
    if args.strategy == "ddp":
        if args.cpu_offload:
            raise ValueError("cpu_offload needs strategy fsdp or hsdp (DDP keeps whole replicas on each device)")
        return
    if args.cpu_offload and device.type != "cuda":
        raise ValueError("cpu_offload moves parameters from the GPU to host memory; this run is already on the CPU")
    if args.cpu_offload:
        for plugin in plugins:
            names = {cls.__name__ for cls in type(plugin).__mro__} & set(_NEEDS_DEVICE_SHARDS)
            if names:  # by name: adversarial.py imports this module
                raise ValueError(
                    f"{names.pop()} is not supported with cpu_offload: its norms over every shard would reduce "
                    "host-memory shards, which the NCCL process group cannot; train without cpu_offload for it"
                )
    if args.precision == "fp16":
        raise ValueError(f"strategy {args.strategy} supports fp32 and bf16 (fp16's GradScaler is not sharded)")


def build_mesh(strategy: str, device: torch.device, shard_size: int = 0):
    """The device mesh: 1-D over every process for fsdp, ``(replicate, shard)`` for hsdp.

    Args:
        strategy: ``"fsdp"`` or ``"hsdp"``.
        device: this process's device (its type names the mesh's).
        shard_size: hsdp's processes per shard group; 0: the GPUs of one node (every process on the CPU).
    """
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if strategy == "fsdp":
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    if shard_size == 0:
        shard_size = min(torch.cuda.device_count(), world) if device.type == "cuda" else world
    if shard_size <= 0 or world % shard_size:
        raise ValueError(f"hsdp: {world} processes do not split into shard groups of {shard_size} (shard_size)")
    return init_device_mesh(device.type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's Transformer blocks, the units that are sharded (and all-gathered) one at a time."""
    from bunmyaku.models.layers import Block

    found = [m for m in model.modules() if isinstance(m, Block)]
    if not found:  # architectures with blocks of their own class: the entries of a ``layers`` list
        found = [m for name, lst in model.named_modules() if name.endswith("layers") for m in lst.children()]
    return found


def shard_model(model: nn.Module, mesh, *, bf16: bool = False, cpu_offload: bool = False) -> nn.Module:
    """Apply ``fully_shard`` to each block, then to the root (in place); returns ``model``.

    Args:
        model: the model, on its device, with its final ``requires_grad`` flags.
        mesh: from :func:`build_mesh`.
        bf16: compute in bfloat16 (weights gathered as bf16) while gradients are reduced in float32.
        cpu_offload: keep the sharded parameters, gradients and optimizer state in host memory (CUDA only).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    options: dict[str, Any] = {"mesh": mesh}
    if bf16:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    options["offload_policy"] = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for block in blocks(model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` (or tensor parallelism, :func:`parallelize`) was applied to ``model``: its weights
    are DTensors, gathered for export and saved as sharded checkpoints."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or is_tensor_parallel(model)


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce-scatter gradients in the next backward (the last micro-batch of a step) or keep them local."""
    if _fsdp_modules(model):  # tensor parallelism alone has no gradient reduction to defer
        model.set_requires_gradient_sync(enabled)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """All-gather every unit's weights once and keep them until the block ends: forwards inside need no
    collective, so processes may run different numbers of them (held-out shares of unequal size)."""
    units = _fsdp_modules(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (the tensor itself otherwise)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor made whole (a collective); the tensor itself otherwise."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of ``tensors`` taken together, as a plain float32 scalar equal on every process.

    A DTensor's norm is reduced over its shards (FSDP's, TP's, both): one collective per device mesh and layout,
    not per tensor. Plain tensors (whole on every process: TP's norms and position tables) count once. What the
    plugins that perturb by a norm (FGM, AWP, SAM) need so that 2 processes move the weights as 1 does.
    """
    groups: dict[Any, list[torch.Tensor]] = {}
    for tensor in tensors:
        mesh = getattr(tensor, "device_mesh", None)
        groups.setdefault(None if mesh is None else (mesh, tuple(tensor.placements)), []).append(tensor)
    if not groups:
        return torch.zeros(())
    parts = [full_tensor(torch.nn.utils.get_total_norm(group)).float() for group in groups.values()]
    return parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack(parts))


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite on every process (DTensors: each process checks its shards,
    then one all-reduce), so that all processes take the same branch (a second pass is a collective)."""
    if not tensors:
        return True
    flag = torch.stack([torch.isfinite(local_tensor(t)).all() for t in tensors]).all().to(torch.int32)
    if dist.is_initialized() and any(hasattr(t, "device_mesh") for t in tensors):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


# ---------------------------------------------------------------------------------------------- whole weights


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight whole, on the CPU, on rank 0 ({} on the others; every process must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load rank 0's :func:`full_state_dict` into the sharded ``model`` (every process must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state if dist_utils.is_main() else {}, options=options)


def export(model: nn.Module, directory: Path, dtype: str | None = None) -> None:
    """Write the sharded ``model`` as one ordinary HF folder (``config.json`` + ``model.safetensors``) from rank 0.

    The whole weights are gathered to rank 0's host memory and loaded into a plain copy of the model built on
    the meta device (no second allocation of random weights). Every process must call it.
    """
    state = full_state_dict(model)
    if not dist_utils.is_main():
        return
    plain = _plain_copy(model, state)
    ckpt.save_model(plain, directory, dtype=dtype)


def unsharded(model: nn.Module) -> nn.Module:
    """A plain copy of the sharded ``model`` (its own class, whole weights) on every process, on the device the
    shards were on: what a run hands back once training is over (predictions, saving, the caller's model).
    Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    device = next(model.parameters()).device
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # whole on every rank
    plain = _plain_copy(model, {k: v.detach().to("cpu") for k, v in state.items()})
    return plain.to(device).train(model.training)


def _plain_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A module of ``model``'s own class (not FSDP's subclass) holding ``state`` on the CPU.

    Built on the meta device, so no random weights are allocated; the buffers left out of a state dict
    (non-persistent ones: rotary frequencies, position tables) are copied from ``model``, where FSDP leaves
    every buffer whole.
    """
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__ if issubclass(c, nn.Module) and not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = cls(model.config)
    plain.load_state_dict(state, strict=False, assign=True)
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    for name, buffer in model.named_buffers():  # non-persistent ones (rotary tables) are not in the state dict
        owner, _, leaf = name.rpartition(".")
        module = plain.get_submodule(owner)
        if getattr(module, leaf).is_meta:
            module.register_buffer(
                leaf, full_tensor(buffer).detach().cpu(), persistent=leaf not in module._non_persistent_buffers_set
            )
    left = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"export: tensors not in the gathered state: {left[:5]}")
    return plain


# ---------------------------------------------------------------------------------------------- checkpoints


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The tensors DCP stores (model and optimizer state, each process's shards) and the optimizer's parameter
    groups (hyper-parameters and parameter names: plain JSON)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(cpu_offload=True))
    return {"model": _without_aliases(model_state), "optimizer": optim_state["state"]}, optim_state["param_groups"]


def _without_aliases(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with each tied tensor once (safetensors refuses two names for one storage)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        pointer = local_tensor(tensor).untyped_storage().data_ptr()
        if pointer not in seen:
            seen.add(pointer)
            out[name] = tensor
    return out


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """DCP warns on every save / load without a process group, even when ``no_dist`` says that is intended (a
    sharded checkpoint read or written by one process)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


# Plugin states under sharded checkpoints: EMA's and SWA's averages are sharded like the parameters (DTensors), so
# rank 0 alone cannot write them to trainer_state.safetensors. Every tensor of every plugin's state goes through DCP
# instead, under ``plugins.<plugin index>.<path in its state>``, and the JSON state holds a stub naming it; a resume
# reads them into the resuming run's own (sharded or whole) plugin tensors, so resharding works for them too.
PLUGIN_TENSOR = "__dcp__"


def split_plugin_states(states: Sequence[dict[str, Any]]) -> tuple[list[Any], dict[str, torch.Tensor]]:
    """The plugins' states with each tensor replaced by a stub ``{"__dcp__": key}``, and the tensors by key (what
    DCP stores: this process's shards of a DTensor)."""
    tensors: dict[str, torch.Tensor] = {}

    def stub(obj: Any, path: tuple[str, ...]) -> Any:
        if torch.is_tensor(obj):
            key = ".".join(path)
            tensors[key] = obj.detach()
            return {PLUGIN_TENSOR: key}
        if isinstance(obj, dict):
            return {k: stub(v, (*path, str(k))) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(stub(v, (*path, str(i))) for i, v in enumerate(obj))
        return obj

    return [stub(state, (str(i),)) for i, state in enumerate(states)], tensors


def _plugin_templates(saved: Sequence[Any], current: Sequence[Any], path: Path) -> dict[str, torch.Tensor]:
    """The tensors of this run's plugin states (``current``) where the checkpoint's (``saved``) hold stubs: DCP loads
    the stored values into them in place.

    Raises:
        ValueError: a stored tensor this run's plugins do not hold (another plugin list than the saved run's).
    """
    found: dict[str, torch.Tensor] = {}

    def match(old: Any, new: Any, where: str) -> None:
        if isinstance(old, dict) and PLUGIN_TENSOR in old:
            if not torch.is_tensor(new):
                raise ValueError(
                    f"{path}: the checkpoint's plugin state holds a tensor at {where}, which this run's plugins do "
                    "not have; resume with the plugins (and settings) of the run that wrote it"
                )
            found[old[PLUGIN_TENSOR]] = new.detach()
        elif isinstance(old, dict):
            for key, value in old.items():
                match(value, new.get(key) if isinstance(new, dict) else None, f"{where}.{key}")
        elif isinstance(old, (list, tuple)):
            for i, value in enumerate(old):
                match(value, new[i] if isinstance(new, (list, tuple)) and i < len(new) else None, f"{where}.{i}")

    for i, (old, new) in enumerate(zip(saved, current, strict=False)):
        match(old, new, f"plugins[{i}]")
    return found


def _fill_plugin_states(saved: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``saved`` with each stub replaced by its loaded tensor."""
    if isinstance(saved, dict) and PLUGIN_TENSOR in saved:
        return tensors.get(saved[PLUGIN_TENSOR], saved)  # a state no plugin of this run takes stays a stub
    if isinstance(saved, dict):
        return {k: _fill_plugin_states(v, tensors) for k, v in saved.items()}
    if isinstance(saved, (list, tuple)):
        return type(saved)(_fill_plugin_states(v, tensors) for v in saved)
    return saved


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    plugin_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a sharded checkpoint for ``step`` (every process calls it); returns its folder.

    Every process writes its shards into ``.tmp-step-N/shards``; rank 0 adds the trainer state and renames the
    folder once all have finished, so a run killed mid-save leaves the previous checkpoint the newest complete one.

    Args:
        root: the checkpoints folder.
        step: the optimizer step.
        model: the (sharded or plain) model.
        optimizer: its optimizer.
        state: rank 0's trainer state without the model and optimizer (step, scheduler, RNG...); its plugin states
            with stubs for their tensors (:func:`split_plugin_states`).
        plugin_tensors: this process's plugin tensors by key, from :func:`split_plugin_states` (every process).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    final = ckpt.step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if dist_utils.is_main():
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / SHARDS).mkdir(parents=True)
    dist_utils.barrier()
    tensors, groups = _dcp_state(model, optimizer)
    if plugin_tensors:
        tensors["plugins"] = plugin_tensors
    writer = HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True)
    with _single_process_is_intended():
        dcp.save(tensors, storage_writer=writer, no_dist=not dist.is_initialized())
    dist_utils.barrier()  # every process's files are complete
    if dist_utils.is_main():
        ckpt.write_state(tmp, {**state, "optimizer_groups": groups, "sharded": True})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        logger.info("Saved sharded checkpoint %s", final)
    dist_utils.barrier()
    return final


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Read and check a sharded checkpoint's trainer state and shard headers; returns the trainer state.

    Raises:
        ValueError: the folder holds an unsharded (strategy ddp) checkpoint.
        UnreadableCheckpointError: a file is missing or cut.
    """
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    if not (path / SHARDS).is_dir() and (path / ckpt.STATE_JSON).is_file():
        raise ValueError(
            f"{path} was written with strategy ddp (whole weights, no {SHARDS}/): resume it with strategy ddp, "
            "or start afresh in another output folder"
        )
    try:
        state = ckpt.read_state(path)
        metadata = HuggingFaceStorageReader(str(path / SHARDS)).read_metadata()  # parses every shard's header
        if not metadata.state_dict_metadata:
            raise ValueError(f"no shards in {path / SHARDS}")
    except Exception as error:
        raise ckpt.UnreadableCheckpointError(f"{path} cannot be read ({type(error).__name__}: {error})") from error
    return state


def latest_readable(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest sharded checkpoint under ``root`` that reads back whole (a damaged newer one is skipped with a
    warning): its folder and trainer state."""
    for _, path in reversed(ckpt.list_checkpoints(root)):
        try:
            return path, read_checkpoint(path)
        except ckpt.UnreadableCheckpointError as error:
            logger.warning("Skipping a damaged checkpoint: %s; trying the one before it", error)
    return None


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    plugins: Sequence[Any] = (),
) -> None:
    """Load a sharded checkpoint's model (and optimizer) into this run's ``model``, however many processes wrote
    it and however many read it (every process calls it).

    The plugins' tensors (EMA's and SWA's averages) are read into ``plugins``' own state tensors, sharded or whole
    like this run's parameters, and put in place of their stubs in ``state["plugins"]``, which is then ready for
    each plugin's ``load_state_dict``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        tensors: dict[str, Any] = {"model": _without_aliases(get_model_state_dict(model))}
    else:
        tensors, _ = _dcp_state(model, optimizer)
    saved_plugins = state.get("plugins") or []
    templates = _plugin_templates(saved_plugins, [p.state_dict() for p in plugins], path)
    if templates:
        tensors["plugins"] = templates
    try:
        reader = HuggingFaceStorageReader(str(path / SHARDS))
        with _single_process_is_intended():
            dcp.load(tensors, storage_reader=reader, no_dist=not dist.is_initialized())
    except Exception as error:
        raise ckpt.UnreadableCheckpointError(f"{path}: the shards do not fit this model ({error})") from error
    set_model_state_dict(model, tensors["model"], options=StateDictOptions(strict=False))
    if optimizer is not None:
        optim_state = {"state": tensors["optimizer"], "param_groups": state["optimizer_groups"]}
        set_optimizer_state_dict(model, optimizer, optim_state)
    state["plugins"] = _fill_plugin_states(saved_plugins, templates)


# ---------------------------------------------------------------------------------------------- tensor parallel
#
# ``--tp N`` splits each Transformer block over N processes (Megatron-LM, Shoeybi et al. 2019 §3): the q, k, v
# projections and the feed-forward's up (and gate) projections are column-parallel (each process computes its
# share of the heads / of the hidden width from the whole input), the attention output and feed-forward down
# projections are row-parallel (each process multiplies its share and the partial sums are all-reduced). One
# all-reduce per sub-layer in the forward, one in the backward.
#
# The vocabulary is split too (Megatron-LM §3, "input embedding" / "output embedding"): the token table's rows
# (row-parallel: each process looks up the ids in its range, zeros elsewhere, and the partial tables are
# all-reduced) and the LM head's rows (column-parallel: each process computes the logits of its ids). A tied head
# stays ONE parameter: table and head split alike (rows, ``Shard(0)``), so after both are split the head takes the
# table's DTensor back and its gradient is the sum of both uses, as without parallelism. The logits are gathered
# whole on every process (not kept split with ``loss_parallel``): every head's loss (shifted, masked, ignore
# index -100), generation's sampling and the plugins read plain logits, and the gather is exact. A vocabulary
# that ``tp`` does not divide is split unevenly (DTensor's ``Shard``: the first ``V mod tp`` processes hold one
# row more), neither refused nor padded, so the checkpoint and the export keep the model's own shapes. Position
# and segment tables, norms and task heads stay whole: they are small, and their inputs and gradients are the same
# on every process of a group. BERT's masked-LM head multiplies by the tied table inside its own forward: it runs
# on DTensors as a whole (its dense layer and LayerNorm replicated, its bias split with the table's rows). The
# processes form a 2-D mesh ``(dp, tp)``, rank = dp index * tp + tp index: a tensor-parallel group reads one batch;
# with strategy fsdp the data-parallel replicas shard over ``dp``. Sequence parallelism is not implemented.

TP_PLAN_COLUMN = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in", "mlp.fc_gate")
TP_PLAN_ROW = ("attn.out_proj", "mlp.fc_out")


def data_coordinates(rank: int, world: int, tp: int) -> tuple[int, int]:
    """(data-parallel index, data-parallel size) of process ``rank``: the processes of a tensor-parallel group read
    the same batches, so data is split over ``world / tp`` replicas.

    Raises:
        ValueError: ``world`` is not a multiple of ``tp`` (fewer processes than ``tp``: not launched by torchrun).
    """
    if world % tp:
        hint = f"; launch with torchrun --nproc-per-node {tp} (or a multiple)" if world < tp else ""
        raise ValueError(f"tp {tp}: the {world} processes do not split into tensor-parallel groups of {tp}{hint}")
    return rank // tp, world // tp


def check_tensor_parallel(model: nn.Module, tp: int, world: int, strategy: str) -> None:
    """Refuse a ``tp`` the model or the process count cannot split into, naming what does not divide.

    Raises:
        ValueError: ``world`` is not a multiple of ``tp``; a block's query or key/value heads or its feed-forward
            width is not a multiple of ``tp``; ``ddp`` replicas beside tensor parallelism (use fsdp); hsdp.
    """
    from bunmyaku.models.attention import Attention

    if world % tp:
        raise ValueError(f"tp {tp}: the {world} processes do not split into tensor-parallel groups of {tp}")
    if strategy == "hsdp":
        raise ValueError("tp with strategy hsdp is not supported; use strategy fsdp (the data-parallel dimension)")
    if strategy == "ddp" and world // tp > 1:
        raise ValueError(
            f"tp {tp} on {world} processes leaves {world // tp} data-parallel replicas: use strategy fsdp for them "
            "(or as many processes as tp)"
        )
    for block in blocks(model):
        for module in block.modules():
            if isinstance(module, Attention):
                if module.is_cross:
                    raise ValueError("tp: cross-attention (encoder-decoder models) has no tensor-parallel plan")
                for what, count in (("attention heads", module.num_heads), ("key/value heads", module.num_kv_heads)):
                    if count % tp:
                        raise ValueError(
                            f"tp {tp} does not divide the model's {count} {what} (config num_heads / num_kv_heads): "
                            f"each process must hold whole heads; choose tp among {_divisors(count)}"
                        )
        for name, module in block.named_modules():
            if name in (*TP_PLAN_COLUMN, *TP_PLAN_ROW) and not isinstance(module, nn.Linear):
                raise ValueError(
                    f"tp: {name} is a {type(module).__name__}, not a linear layer (LoRA adapters or another wrapper): "
                    "tensor parallelism splits plain linears only; train without tp or without the wrapper"
                )
        fc_in = block.get_submodule("mlp.fc_in") if hasattr(block, "mlp") else None
        if fc_in is not None and fc_in.out_features % tp:
            raise ValueError(f"tp {tp} does not divide the feed-forward width {fc_in.out_features} (intermediate_size)")


def check_tensor_parallel_settings(args: Any, plugins: Sequence[object]) -> None:
    """Refuse what a tensor-parallel run cannot honour: fp16's loss scaler, ``compile``. The plugins run on split
    weights as on FSDP's shards (``plugins`` is kept for settings that some plugin cannot honour).

    Raises:
        ValueError: naming the setting and why.
    """
    if args.precision == "fp16":
        raise ValueError(f"tp {args.tp} supports fp32 and bf16 (fp16's GradScaler does not unscale split gradients)")
    if args.compile:
        raise ValueError(f"tp {args.tp} with compile is not supported (not tested); train without compile")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def build_tp_mesh(device: torch.device, tp: int):
    """The 2-D device mesh ``(dp, tp)`` over every process: ``mesh["tp"]`` a tensor-parallel group,
    ``mesh["dp"]`` the data-parallel replicas."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    return init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))


def parallelize(model: nn.Module, tp_mesh) -> nn.Module:
    """Split every block's projections and the vocabulary (:func:`split_vocabulary`) over ``tp_mesh`` (in place;
    returns ``model``), see the notes above.

    The projections' weights become DTensors sharded by rows (column-parallel) or columns (row-parallel) and
    their outputs plain tensors: the column-parallel ones hold this process's heads, so each attention module
    is told its local head counts (its reshapes and its KV cache use them).
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from bunmyaku.models.attention import Attention

    tp = tp_mesh.size()
    for block in blocks(model):
        names = {name for name, _ in block.named_modules()}
        plan: dict[str, Any] = {name: ColwiseParallel() for name in TP_PLAN_COLUMN if name in names}
        plan.update({name: RowwiseParallel() for name in TP_PLAN_ROW if name in names})
        missing = [name for name in (*TP_PLAN_COLUMN[:3], TP_PLAN_ROW[0]) if name not in names]
        if missing:
            raise ValueError(f"tp: {type(block).__name__} has no {missing}; no tensor-parallel plan for it")
        parallelize_module(block, tp_mesh, plan)
        for module in block.modules():
            if isinstance(module, Attention):
                module.num_heads //= tp
                module.num_kv_heads //= tp
                module._fused_qkv = None
    split_vocabulary(model, tp_mesh)
    model._tensor_parallel = tp  # read by is_tensor_parallel
    return model


def split_vocabulary(model: nn.Module, tp_mesh) -> bool:
    """Split the token table and the vocabulary projection (LM head, BERT's masked-LM head) by rows over ``tp_mesh``
    (in place), see the notes above; returns whether it did.

    Left whole (False, logged): a model that does not say where its token table is, or a head of another kind
    that reads the table's weight in its own forward (it would meet a split table it cannot use).
    """
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from bunmyaku.models.bert import BertMLMHead

    try:
        table = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        logger.info("tp: %s does not say where its token table is; the vocabulary stays whole", type(model).__name__)
        return False
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    mlm_heads = [m for m in model.modules() if isinstance(m, BertMLMHead) and m.embedding[0] is table]
    unknown = [m for m in mlm_heads if type(m).forward is not BertMLMHead.forward]
    if unknown or (output is not None and not isinstance(output, nn.Linear)) or not isinstance(table, nn.Embedding):
        logger.info("tp: %s has a vocabulary head of its own kind; the vocabulary stays whole", type(model).__name__)
        return False
    tied = output is not None and output.weight is table.weight
    parallelize_module(table, tp_mesh, RowwiseParallel(input_layouts=Replicate()))  # ids whole, embeddings summed
    if output is not None:
        parallelize_module(output, tp_mesh, ColwiseParallel(output_layouts=Replicate()))  # logits gathered
        if tied:  # both split by rows alike: the head takes the table's DTensor back (one parameter, one gradient)
            output.weight = table.weight
    for head in mlm_heads:
        _split_mlm_head(head, tp_mesh)
    return True


def _split_mlm_head(head: nn.Module, tp_mesh) -> None:
    """BERT's masked-LM head on DTensors: the hidden states enter replicated, the dense layer and LayerNorm are
    replicated, the bias is split like the (already split) tied table's rows, and the logits leave gathered."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor

    def partition(_name: str, module: nn.Module, mesh) -> None:
        for name, param in list(module.named_parameters(recurse=False)):
            placement = Shard(0) if module is head and name == "bias" else Replicate()
            split = distribute_tensor(param.detach(), mesh, [placement])
            module.register_parameter(name, nn.Parameter(split, requires_grad=param.requires_grad))

    def enter(_module: nn.Module, inputs: tuple, mesh) -> tuple:
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False) for x in inputs)

    def leave(_module: nn.Module, logits, _mesh) -> torch.Tensor:
        return logits.redistribute(placements=[Replicate()]).to_local()

    distribute_module(head, tp_mesh, partition, input_fn=enter, output_fn=leave)


def is_tensor_parallel(model: nn.Module) -> bool:
    """Whether :func:`parallelize` was applied to ``model``."""
    return getattr(model, "_tensor_parallel", 1) > 1


def unfuse_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Step ``optimizer`` one tensor at a time, not with its fused or foreach kernels (in place).

    Those kernels take a group's tensors in one call, which refuses plain tensors beside DTensors (the whole
    embeddings and norms beside the split projections) and DTensors of two meshes (with FSDP). Splitting the groups
    by kind instead would make a checkpoint's groups differ from a run without tensor parallelism, which could then
    not resume it.
    """
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = False, False


@torch.no_grad()
def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over gradients that mix plain tensors and DTensors (of several meshes),
    which its fused norm refuses; returns the total norm, the same on every process."""
    squares = []
    for p in params:
        if p.grad is None:
            continue
        norm = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
        squares.append(full_tensor(norm) ** 2)  # a DTensor's norm is reduced over its shards
    if not squares:
        return torch.zeros(())
    total = torch.stack(squares).sum().sqrt()
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(float(coefficient))  # a Python number: DTensor gradients take no plain tensor
    return total


def parallelize_for_inference(model: nn.Module, tp: int) -> nn.Module:
    """Split ``model`` over every process of the group (``tp`` of them) for generation (``bunmyaku generate --tp``).

    Every process runs the same forwards on the same inputs (the projections' collectives need all of them);
    greedy decoding then picks the same tokens everywhere, and sampling does when every process seeds alike.

    Raises:
        ValueError: no process group of ``tp`` processes (not under torchrun), or heads ``tp`` does not divide.
    """
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != tp:
        raise ValueError(f"tp {tp} needs {tp} processes, found {world}: launch with torchrun --nproc-per-node {tp}")
    check_tensor_parallel(model, tp, world, "ddp")
    device = next(model.parameters()).device
    return parallelize(model, init_device_mesh(device.type, (tp,), mesh_dim_names=("tp",)))


def same_seed(seed: int | None) -> int | None:
    """``seed``, or (None) one drawn by rank 0 and shared, so that every process samples the same tokens."""
    if seed is not None or not dist.is_initialized():
        return seed
    box = [int(torch.randint(0, 2**31 - 1, ()).item())]
    dist.broadcast_object_list(box, src=0)
    return box[0]
