"""Deterministic seeds derived from several integers (run seed, rank, step, sample index)."""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 64-bit seed hashed from `keys`: (s, i + 1) and (s + 1, i) give unrelated seeds."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])


def generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from `keys`."""
    return torch.Generator().manual_seed(derive_seed(*keys))
