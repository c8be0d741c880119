"""The training loop's batch iterator, starting at any data position (exact resume)."""

from __future__ import annotations

from typing import Iterator

import torch

from ..protocols import Dataset
from .sampler import epoch_indices


class StepBatches(torch.utils.data.Sampler):
    """Index lists for positions start, start + 1, ... (see `epoch_indices`)."""

    def __init__(self, size: int, seed: int, rank: int, world: int, per_rank: int, start: int):
        self.args = (size, seed, rank, world, per_rank)
        self.start = start

    def __iter__(self):
        size, seed, rank, world, per_rank = self.args
        position = self.start
        while True:
            yield epoch_indices(size, position, rank, world, per_rank, seed).tolist()
            position += 1




def batches(data: Dataset, seed: int, rank: int, world: int, per_rank: int, start: int,
            num_workers: int = 0, prefetch_factor: int = 2,
            pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (x0, labels) for data positions start, start + 1, ...

    In-memory and synthetic datasets (with a `batch` method) are read directly; item datasets
    go through a DataLoader with `num_workers` worker processes prefetching ahead of the step.
    """
    if hasattr(data, "batch"):
        position = start
        while True:
            yield data.batch(seed, position, rank, world, per_rank)
            position += 1
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=StepBatches(len(data), seed, rank, world, per_rank, start), num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers else None, pin_memory=pin_memory,
        persistent_workers=False)
    for x, y in loader:
        yield x, (y if data.num_classes else None)
