"""Stateless data positions: the batch of a step is a function of (seed, step, rank), so a
resumed run reads exactly the data an uninterrupted run would have read."""

from __future__ import annotations

import functools

import torch

from ..errors import DataError  # noqa: F401  (still importable from here)
from ..seeding import generator


@functools.lru_cache(maxsize=2)
def epoch_permutation(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of range(size) that epoch `epoch` visits, drawn from generator (seed, epoch).

    Drawn once and kept: a step only slices it, so choosing a batch costs O(batch), not O(size).
    Two entries cover a batch that straddles an epoch boundary.  Callers must not modify it.
    """
    return torch.randperm(size, generator=generator(seed, epoch))


def epoch_indices(size: int, step: int, rank: int, world: int, per_rank: int, seed: int) -> torch.Tensor:
    """Indices for `rank` at `step` in the stream of per-epoch permutations of range(size).

    Step k of the global batch covers stream positions [k G, (k + 1) G), G = world * per_rank;
    rank r takes the r-th slice.  Epoch e is the permutation drawn from generator (seed, e).
    The indices come in stream order, which is random: callers that split a batch into row groups
    rely on it (every group then sees every class, whatever order the dataset is stored in).
    """
    start = (step * world + rank) * per_rank
    first, last = start // size, (start + per_rank - 1) // size
    if first == last:  # the common case: one slice of one permutation
        offset = start - first * size
        return epoch_permutation(size, seed, first)[offset:offset + per_rank].clone()
    positions = torch.arange(start, start + per_rank)
    epochs = positions // size
    out = torch.empty(per_rank, dtype=torch.long)
    for e in range(first, last + 1):
        sel = epochs == e
        out[sel] = epoch_permutation(size, seed, e)[positions[sel] % size]
    return out
