"""2-D toy distributions and arbitrary point clouds ([N, D] float arrays in .npy files).

TOYS maps each `data.name` to its sampler: the stock sets below and the multi-scale validation
family of `toy_family` (gmm_scales, gmm_grid, ring_gap, rings, spiral, holes, thin, multiscale)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from ..seeding import generator
from .sampler import epoch_indices
from .toy_family import FAMILY


def checkerboard(n: int, g: torch.Generator) -> Tensor:
    """Uniform on the 8 dark squares of a 4x4 board covering [-2, 2]^2."""
    x = torch.rand(n, generator=g) * 4 - 2
    row = torch.randint(2, (n,), generator=g) * 2 + torch.rand(n, generator=g)  # in [0, 1) or [2, 3)
    y = row - 2 + (torch.floor(x) % 2)  # shift odd columns by one square
    return torch.stack([x, y], dim=1)


def moons(n: int, g: torch.Generator, noise: float = 0.05) -> Tensor:
    """Two interleaved half circles, centred and scaled to about unit spread."""
    upper = torch.randint(2, (n,), generator=g).bool()
    angle = torch.rand(n, generator=g) * math.pi
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    pts = torch.stack([x - 0.5, y - 0.25], dim=1) * 1.6
    return pts + noise * torch.randn(n, 2, generator=g)


def eight_gaussians(n: int, g: torch.Generator, radius: float = 2.0, std: float = 0.15) -> Tensor:
    """n points from eight Gaussians of std `std` evenly spaced on a circle of `radius`."""
    k = torch.randint(8, (n,), generator=g).float()
    centers = radius * torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], dim=1)
    return centers + std * torch.randn(n, 2, generator=g)


def spirals(n: int, g: torch.Generator, noise: float = 0.05) -> Tensor:
    """Two interleaved Archimedean spirals."""
    r = torch.sqrt(torch.rand(n, generator=g))
    angle = r * 3 * math.pi
    arm = torch.randint(2, (n,), generator=g) * math.pi
    pts = 2 * r[:, None] * torch.stack([torch.cos(angle + arm), torch.sin(angle + arm)], dim=1)
    return pts + noise * torch.randn(n, 2, generator=g)


TOYS = {"checkerboard": checkerboard, "moons": moons, "8gaussians": eight_gaussians, "spirals": spirals, **FAMILY}


class ToyData:
    """An unlimited stream: batch k of rank r is drawn from the generator seeded by (seed, k, r)."""

    num_classes = 0

    def __init__(self, name: str):
        self.name, self.draw = name, TOYS[name]
        self.sample_shape = (2,)

    def batch(self, seed: int, position: int, rank: int, world: int, n: int) -> tuple[Tensor, None]:
        return self.draw(n, generator(seed, position, rank)), None

    def reference(self, n: int, seed: int = 12345) -> Tensor:
        return self.draw(n, torch.Generator().manual_seed(seed))


class PointData:
    """Rows of an [N, D] float array, visited in per-epoch shuffles shared by all ranks."""

    num_classes = 0

    def __init__(self, path: str | None):
        if not path:
            raise DataError("data.name=points needs data.path=FILE.npy, an [N, D] float array")
        file = Path(path)
        if not file.is_file():
            raise DataError(f"{file}: no such file; data.path must be an .npy file holding an [N, D] float array")
        try:
            arr = np.load(file, allow_pickle=False)
        except Exception as e:
            raise DataError(f"{file}: not a readable .npy array ({type(e).__name__}); expected an [N, D] float array") from None
        if arr.ndim != 2 or arr.shape[0] < 2 or not np.issubdtype(arr.dtype, np.floating):
            raise DataError(f"{file}: got a {arr.dtype} array of shape {arr.shape}; expected an [N, D] float array, N >= 2")
        if not np.isfinite(arr).all():
            raise DataError(f"{file}: holds NaN or infinite values")
        self.points = torch.from_numpy(arr.astype(np.float32))
        self.sample_shape = (arr.shape[1],)

    def batch(self, seed: int, position: int, rank: int, world: int, n: int) -> tuple[Tensor, None]:
        return self.points[epoch_indices(len(self.points), position, rank, world, n, seed)], None

    def reference(self, n: int, seed: int = 12345) -> Tensor:
        idx = torch.randperm(len(self.points), generator=torch.Generator().manual_seed(seed))[:n]
        return self.points[idx]
