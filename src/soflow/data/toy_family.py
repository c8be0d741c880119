"""A validation family of 2-D distributions with structure at several scales.

The stock toys (checkerboard, moons) are smooth at one scale; defaults tuned on them need not
carry over.  This family probes what they miss: tiny blobs beside a wide one, thin rings with and
without a gap, a spiral arm, a density with empty holes, structures about 0.01 wide, and a
cloud mixing several of these.  Every member lies roughly in [-2.5, 2.5]^2 and is selectable as
`data.name`:

    gmm_scales   a wide Gaussian (std 0.6) at (-0.8, 0) holding half the mass, and four blobs of
                 std 0.02, 0.04, 0.08 and 0.16 in a column at x = 1.3 (1/8 of the mass each)
    gmm_grid     25 Gaussians of std 0.05 on the 5x5 grid {-2, -1, 0, 1, 2}^2, equal weights
    ring_gap     a ring of radius 1.5 (radial std 0.03) with no points in the 60-degree sector
                 around angle 0 (the positive x axis)
    rings        two concentric rings of radius 0.7 and 1.8 (radial std 0.03), mass 1/3 and 2/3
    spiral       one Archimedean arm from radius 0.2 to 2.2 over two turns, normal noise 0.04
    holes        uniform on [-2, 2]^2 minus five discs of radius 0.45 at (0, 0) and (+-1, +-1)
    thin         a circle of radius 1.7 and the two segments from (-1, -1) to (1, 1) and from
                 (-1, 1) to (1, -1), all with normal noise of std 0.005 across (width ~0.01)
    multiscale   the three-scale cloud: a ring of radius 1.8 (radial std 0.03) with a gap of 70
                 degrees around angle 45 (mass 0.4); three small blobs of std 0.03 at (-0.6, 0.5),
                 (0.1, -0.7) and (0.7, 0.3) (0.1 each); one spiral arm from radius 0.3 to 1.3 over
                 one turn with noise 0.03 (mass 0.3)

Each member is `draw(n, g) -> Tensor[n, 2]` (float32), a function of the generator's state alone:
the same seed gives the same points.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _choose(n: int, weights: list[float], g: torch.Generator) -> Tensor:
    """Component index per point, drawn with the given weights."""
    return torch.multinomial(torch.tensor(weights, dtype=torch.float64), n, replacement=True, generator=g)


def _ring(n: int, g: torch.Generator, radius: float, std: float, gap_center: float = 0.0,
          gap: float = 0.0) -> Tensor:
    """Points on a circle of the given radius with normal radial noise; angles in the sector of width
    `gap` (radians) around `gap_center` are left out."""
    angle = gap_center + gap / 2 + torch.rand(n, generator=g, dtype=torch.float64) * (2 * math.pi - gap)
    rad = radius + std * torch.randn(n, generator=g, dtype=torch.float64)
    return torch.stack([rad * torch.cos(angle), rad * torch.sin(angle)], dim=1)


def _arm(n: int, g: torch.Generator, r0: float, r1: float, turns: float, noise: float) -> Tensor:
    """A spiral arm r = r0 + (r1 - r0) u, angle = 2 pi turns u, with u uniform in [0, 1)."""
    u = torch.rand(n, generator=g, dtype=torch.float64)
    rad, angle = r0 + (r1 - r0) * u, 2 * math.pi * turns * u
    pts = torch.stack([rad * torch.cos(angle), rad * torch.sin(angle)], dim=1)
    return pts + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)


def _mixture(n: int, g: torch.Generator, weights: list[float], parts) -> Tensor:
    """Draw every component for all n points (fixed use of the generator), then pick per point."""
    which = _choose(n, weights, g)
    drawn = torch.stack([part(n, g) for part in parts])  # [K, n, 2]
    return drawn[which, torch.arange(n)]


def _blob(center: tuple[float, float], std: float):
    c = torch.tensor(center, dtype=torch.float64)
    return lambda n, g: c + std * torch.randn(n, 2, generator=g, dtype=torch.float64)


GMM_SCALES = [((-0.8, 0.0), 0.6), ((1.3, 1.5), 0.02), ((1.3, 0.5), 0.04), ((1.3, -0.5), 0.08), ((1.3, -1.6), 0.16)]
HOLES = [(0.0, 0.0), (1.0, 1.0), (1.0, -1.0), (-1.0, 1.0), (-1.0, -1.0)]
HOLE_RADIUS = 0.45
MULTISCALE_BLOBS = [(-0.6, 0.5), (0.1, -0.7), (0.7, 0.3)]


def gmm_scales(n: int, g: torch.Generator) -> Tensor:
    """n points of `gmm_scales`: one wide Gaussian and four blobs of growing std (module docstring)."""
    return _mixture(n, g, [0.5] + [0.125] * 4, [_blob(c, s) for c, s in GMM_SCALES]).float()


def gmm_grid(n: int, g: torch.Generator) -> Tensor:
    """n points of `gmm_grid`: 25 Gaussians of std 0.05 on a 5x5 grid."""
    k = torch.randint(25, (n,), generator=g)
    centers = torch.stack([k % 5, k // 5], dim=1).double() - 2
    return (centers + 0.05 * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()


def ring_gap(n: int, g: torch.Generator) -> Tensor:
    """n points of `ring_gap`: a thin ring of radius 1.5 with a 60-degree gap."""
    return _ring(n, g, 1.5, 0.03, gap_center=0.0, gap=math.radians(60)).float()


def rings(n: int, g: torch.Generator) -> Tensor:
    """n points of `rings`: two concentric thin rings of radius 0.7 and 1.8."""
    return _mixture(n, g, [1 / 3, 2 / 3], [lambda n, g: _ring(n, g, 0.7, 0.03),
                                           lambda n, g: _ring(n, g, 1.8, 0.03)]).float()


def spiral(n: int, g: torch.Generator) -> Tensor:
    """n points of `spiral`: one Archimedean arm over two turns."""
    return _arm(n, g, 0.2, 2.2, 2.0, 0.04).float()


def holes(n: int, g: torch.Generator) -> Tensor:
    """Rejection sampling: uniform candidates in [-2, 2]^2, those inside a hole dropped (about 80 %
    are kept), repeated until n points remain."""
    centers = torch.tensor(HOLES, dtype=torch.float64)
    kept, have = [], 0
    while have < n:
        x = torch.rand(2 * n, 2, generator=g, dtype=torch.float64) * 4 - 2
        x = x[(torch.cdist(x, centers) > HOLE_RADIUS).all(dim=1)]
        kept.append(x)
        have += len(x)
    return torch.cat(kept)[:n].float()


def _segment(a: tuple[float, float], b: tuple[float, float], std: float):
    a_, b_ = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)

    def draw(n: int, g: torch.Generator) -> Tensor:
        u = torch.rand(n, 1, generator=g, dtype=torch.float64)
        return a_ + u * (b_ - a_) + std * torch.randn(n, 2, generator=g, dtype=torch.float64)

    return draw


def thin(n: int, g: torch.Generator) -> Tensor:
    """n points of `thin`: a circle and two crossing segments, about 0.01 wide."""
    # mass in proportion to length: circle 2 pi 1.7 = 10.7, each diagonal 2 sqrt 2 = 2.8
    return _mixture(n, g, [0.65, 0.175, 0.175], [lambda n, g: _ring(n, g, 1.7, 0.005),
                                                 _segment((-1, -1), (1, 1), 0.005),
                                                 _segment((-1, 1), (1, -1), 0.005)]).float()


def multiscale(n: int, g: torch.Generator) -> Tensor:
    """n points of `multiscale`: a ring with a gap, three small blobs and a spiral arm."""
    parts = [lambda n, g: _ring(n, g, 1.8, 0.03, gap_center=math.pi / 4, gap=math.radians(70))]
    parts += [_blob(c, 0.03) for c in MULTISCALE_BLOBS]
    parts += [lambda n, g: _arm(n, g, 0.3, 1.3, 1.0, 0.03)]
    return _mixture(n, g, [0.4, 0.1, 0.1, 0.1, 0.3], parts).float()


FAMILY = {"gmm_scales": gmm_scales, "gmm_grid": gmm_grid, "ring_gap": ring_gap, "rings": rings, "spiral": spiral,
          "holes": holes, "thin": thin, "multiscale": multiscale}
