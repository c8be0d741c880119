"""Distances between two point clouds x [n, d] and y [m, d] (e.g. 2-D toy samples and data).

Both are computed in float64 and return Python floats; both are 0 for identical sets and grow as
the sets move apart.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor


def _points(a, name: str) -> Tensor:
    t = a.detach() if torch.is_tensor(a) else torch.as_tensor(np.asarray(a))
    t = t.to(torch.float64)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2 or t.shape[0] < 1:
        raise ValueError(f"{name}: expected points [n, d], got shape {tuple(t.shape)}")
    return t


def _pair(x, y) -> tuple[Tensor, Tensor]:
    x, y = _points(x, "x"), _points(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has dimension {x.shape[1]} but y has {y.shape[1]}")
    return x, y.to(x.device)


def _mean_distance(a: Tensor, b: Tensor, block: int = 2048) -> Tensor:
    """Mean of |a_i - b_j| over all n*m pairs, in blocks to bound memory."""
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for i in range(0, a.shape[0], block):
        for j in range(0, b.shape[0], block):
            d = torch.cdist(a[i:i + block], b[j:j + block], compute_mode="donot_use_mm_for_euclid_dist")
            total = total + d.sum()
    return total / (a.shape[0] * b.shape[0])


def energy_distance(x: Tensor | ArrayLike, y: Tensor | ArrayLike) -> float:
    """Squared energy distance between the empirical distributions of x [n, d] and y [m, d]:

        D² = 2 E|X - Y| - E|X - X'| - E|Y - Y'|

    with Euclidean norms and every expectation a mean over all pairs (n*m, n*n and m*m pairs,
    the i = j terms included), in float64. In this V-statistic form D² >= 0, and D² = 0 exactly
    when the two empirical distributions are equal.
    """
    x, y = _pair(x, y)
    d = 2 * _mean_distance(x, y) - _mean_distance(x, x) - _mean_distance(y, y)
    return float(d)


def _w2_squared_sorted(a: Tensor, b: Tensor) -> Tensor:
    """Squared 1-D W2 between empirical distributions, per column, for column-sorted a [n, P], b [m, P].

    W2² = ∫_0^1 (F_a^{-1}(u) - F_b^{-1}(u))² du with the empirical quantile functions, which are
    step functions with breaks at i/n and j/m: the integral is exact on the merged breaks.
    """
    n, m = a.shape[0], b.shape[0]
    if n == m:
        return ((a - b) ** 2).mean(dim=0)
    # Merged breakpoints as exact fractions k / (n*m): i/n = i*m/(nm), j/m = j*n/(nm).
    breaks = torch.unique(torch.cat([torch.arange(1, n + 1) * m, torch.arange(1, m + 1) * n]))
    lower = torch.cat([torch.zeros(1, dtype=breaks.dtype), breaks[:-1]])
    width = (breaks - lower).to(torch.float64) / (n * m)
    # On (lower, break], the quantile index of a is ceil(u*n) - 1 = ceil(break / m) - 1, and of b likewise.
    ia = (breaks + m - 1) // m - 1
    ib = (breaks + n - 1) // n - 1
    diff = a[ia.to(a.device)] - b[ib.to(b.device)]
    return (width.to(a.device)[:, None] * diff**2).sum(dim=0)


def sliced_wasserstein2(x: Tensor | ArrayLike, y: Tensor | ArrayLike, num_projections: int = 256,
                        seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between the empirical distributions of x [n, d] and y [m, d]:

        SW2 = ( mean_k W2²(θ_k·x, θ_k·y) )^{1/2}

    over ``num_projections`` directions θ_k drawn uniformly on the unit sphere (normalized
    Gaussians from a generator seeded with ``seed``, so the result is deterministic). Each 1-D
    W2² = ∫_0^1 (F^{-1}(u) - G^{-1}(u))² du is computed exactly from the sorted projections: the
    mean squared difference of the sorted values when n == m, and quantile matching on the merged
    breaks i/n, j/m otherwise. In float64.
    """
    x, y = _pair(x, y)
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    g = torch.Generator().manual_seed(int(seed))
    theta = torch.randn(x.shape[1], num_projections, generator=g, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(x.device)
    px = torch.sort(x @ theta, dim=0).values
    py = torch.sort(y @ theta, dim=0).values
    return float(_w2_squared_sorted(px, py).mean().sqrt())
