"""Stateless data positions: the batch of a step is a function of (seed, step, rank), so a
resumed run reads exactly the data an uninterrupted run would have read."""

from __future__ import annotations

import torch

from ..seeding import generator


class DataError(ValueError):
    """A missing or malformed dataset; the message names the file and what is expected."""


def epoch_indices(size: int, step: int, rank: int, world: int, per_rank: int, seed: int) -> torch.Tensor:
    """Indices for `rank` at `step` in the stream of per-epoch permutations of range(size).

    Step k of the global batch covers stream positions [k G, (k + 1) G), G = world * per_rank;
    rank r takes the r-th slice.  Epoch e is the permutation drawn from generator (seed, e).
    """
    start = (step * world + rank) * per_rank
    positions = torch.arange(start, start + per_rank)
    epochs = positions // size
    out = torch.empty(per_rank, dtype=torch.long)
    for e in epochs.unique().tolist():
        sel = epochs == e
        perm = torch.randperm(size, generator=generator(seed, e))
        out[sel] = perm[positions[sel] % size]
    return out
