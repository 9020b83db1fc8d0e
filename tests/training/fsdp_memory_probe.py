"""Run under torchrun: one FSDP2 training step of a GPT-2 (``config.json`` given), then rank 0 prints the bytes of
its local shards of the parameters, gradients and AdamW state as JSON (the oracle of tests/training/test_memory.py).

    python -m torch.distributed.run --nproc-per-node 2 -m tests.training.fsdp_memory_probe CONFIG_JSON
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from bunmyaku.models.gpt2 import TASKS, GPT2Config


def _local_bytes(tensor: torch.Tensor) -> int:
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).nbytes


def main(config_path: str) -> None:
    dist.init_process_group("gloo")
    try:
        with open(config_path, encoding="utf-8") as file:
            config = GPT2Config.from_hf(json.load(file))
        torch.manual_seed(0)
        model = TASKS["causal-lm"](config)
        for layer in model.backbone.layers:  # per-layer wrapping, then the root (embeddings, final norm, head)
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(0, config.vocab_size, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        gradients = sum(_local_bytes(p.grad) for p in model.parameters())
        optimizer.step()
        parameters = sum(_local_bytes(p) for p in model.parameters())
        states = sum(_local_bytes(t) for state in optimizer.state.values() for t in state.values())
        if dist.get_rank() == 0:
            print(json.dumps({"parameters": parameters, "gradients": gradients, "optimizer": states}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
