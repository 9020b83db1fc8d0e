"""Run under torchrun: one training step of a model split over the processes, then rank 0 writes the bytes of its
local parts of the parameters, gradients and AdamW state as JSON (the oracle of tests/training/test_memory.py).

    python -m torch.distributed.run --nproc-per-node 2 -m tests.training.memory_probe CONFIG_JSON OUT_JSON fsdp|tp

``fsdp``: FSDP2's ``fully_shard`` per layer, then the root (a GPT-2 config); ``tp``: the Trainer's tensor-parallel
split (training/sharding.py: its mesh, its plan, its unfused optimizer) of a causal LM of any family.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from bunmyaku.models.auto import model_class
from bunmyaku.training import sharding
from bunmyaku.training.distributed import process_group_from_env
from tests.training.helpers import fail_if_group_outlived


def _local_bytes(tensor: torch.Tensor) -> int:
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).nbytes


def _split(model: torch.nn.Module, mode: str) -> torch.optim.Optimizer:
    if mode == "fsdp":
        for layer in model.backbone.layers:  # per-layer wrapping, then the root (embeddings, final norm, head)
            fully_shard(layer)
        fully_shard(model)
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    mesh = sharding.build_tp_mesh(torch.device("cpu"), dist.get_world_size())
    sharding.parallelize(model, mesh["tp"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # as training/optim.py builds it
    sharding.unfuse_optimizer(optimizer)
    return optimizer


def _measure(config_path: str, out: str, mode: str) -> None:
    config_dict = json.loads(Path(config_path).read_text(encoding="utf-8"))
    cls = model_class(config_dict["model_type"], "causal-lm")
    torch.manual_seed(0)
    model = cls(cls.configure(config_dict))
    optimizer = _split(model, mode)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    gradients = sum(_local_bytes(p.grad) for p in model.parameters())
    optimizer.step()
    parameters = sum(_local_bytes(p) for p in model.parameters())
    states = sum(_local_bytes(t) for state in optimizer.state.values() for t in state.values())
    if dist.get_rank() == 0:
        result = {"parameters": parameters, "gradients": gradients, "optimizer": states}
        Path(out).write_text(json.dumps(result), encoding="utf-8")


def main(config_path: str, out: str, mode: str) -> None:
    with process_group_from_env("gloo"):  # the model and optimizer, which hold the group, are gone when it ends
        _measure(config_path, out, mode)


if __name__ == "__main__":
    main(*sys.argv[1:4])
    fail_if_group_outlived()
