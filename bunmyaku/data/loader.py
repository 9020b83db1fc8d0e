"""Micro-batches for training: shuffled each epoch, sharded over processes, resumable at any batch.

The order of an epoch is a permutation seeded by ``(seed, epoch)``. Global batch ``i`` is the slice
``[i * B * W, (i + 1) * B * W)`` of it and process ``r`` of ``W`` takes every W-th example of that slice from
``r``, so ``W`` processes with micro-batches of ``B`` see together exactly the batches one process sees with
micro-batches of ``B * W``. The position (epoch, batch) is all a checkpoint needs to resume the stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


def check_batch_size(batch_size: Any, name: str = "batch_size") -> None:
    """Raise a ValueError naming ``name`` unless ``batch_size`` is a positive integer (0 would loop forever or
    divide by zero far from where it was given)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{name} must be a positive integer, got {batch_size!r}")


class BatchStream:
    """An endless stream of micro-batches over a map-style dataset (``__len__``, ``__getitem__``).

    Args:
        dataset: the examples; ``set_epoch(epoch)`` is called on it when it has one.
        collator: ``collator(examples, epoch=, indices=)`` -> a batch of tensors.
        batch_size: examples per micro-batch on this process.
        shuffle: a new seeded permutation each epoch; False keeps the dataset order.
        seed: seeds the permutations.
        rank: this process's index.
        world_size: the number of processes.
    """

    def __init__(
        self,
        dataset: Any,
        collator: Callable[..., dict[str, Any]],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        check_batch_size(batch_size)
        self.dataset = dataset
        self.collator = collator
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = len(dataset) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(dataset)} examples are fewer than one global batch "
                f"({batch_size} x {world_size} processes); use a smaller batch or more data"
            )
        self.epoch = 0
        self.position = 0  # batches of this epoch already drawn
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            n = len(self.dataset)
            self._order = (
                np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
            )
        return self._order

    def next_batch(self) -> dict[str, Any]:
        """The next micro-batch of this process, moving to a new epoch when this one is used up."""
        if self.position == self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            self._order = None
        global_size = self.batch_size * self.world_size
        lo = self.position * global_size
        indices = self._epoch_order()[lo : lo + global_size][self.rank :: self.world_size]
        self.position += 1
        examples = [self.dataset[int(i)] for i in indices]
        return self.collator(examples, epoch=self.epoch, indices=[int(i) for i in indices])

    def state_dict(self) -> dict[str, int]:
        """The stream's position."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by :meth:`state_dict`."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = None


def eval_batches(
    dataset: Any, collator: Callable[..., dict[str, Any]], batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[dict[str, Any]]:
    """One pass over ``dataset`` in order, this process's share (every ``world_size``-th example), last batch kept."""
    check_batch_size(batch_size)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(0)
    indices = np.arange(rank, len(dataset), world_size)
    for lo in range(0, len(indices), batch_size):
        chunk = [int(i) for i in indices[lo : lo + batch_size]]
        yield collator([dataset[i] for i in chunk], epoch=0, indices=chunk)
