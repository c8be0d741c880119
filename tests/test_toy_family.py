"""The multi-scale validation family of 2-D toys (soflow.data.toy_family)."""

import math

import pytest
import torch

from soflow.data import DATASETS, make_dataset
from soflow.data.toy import TOYS
from soflow.data.toy_family import FAMILY, GMM_SCALES, HOLE_RADIUS, HOLES
from soflow.eval import energy_distance

N = 4000


def draw(name, seed=0, n=N):
    return FAMILY[name](n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(FAMILY))
def test_member_shape_finite_deterministic_and_registered(name):
    x = draw(name)
    assert x.shape == (N, 2) and x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    assert x.abs().max() < 3.5
    assert torch.equal(x, draw(name)) and not torch.equal(x, draw(name, seed=1))
    assert name in TOYS and name in DATASETS

    class Cfg:
        pass

    cfg = Cfg()
    cfg.name = name
    data = make_dataset(cfg)
    x0, labels = data.batch(0, 3, 0, 1, 64)
    assert x0.shape == (64, 2) and labels is None and data.sample_shape == (2,)


def polar(x):
    return x.norm(dim=1), torch.atan2(x[:, 1], x[:, 0])


def test_rings_radii_and_gaps():
    rad, angle = polar(draw("ring_gap"))
    assert abs(rad.mean() - 1.5) < 0.01 and rad.std() < 0.05
    assert bool((angle.abs() > math.radians(30)).all())  # the 60-degree gap around angle 0 is empty
    rad, _ = polar(draw("rings"))
    inner = rad < 1.25
    assert abs(rad[inner].mean() - 0.7) < 0.01 and abs(rad[~inner].mean() - 1.8) < 0.01
    assert abs(inner.float().mean() - 1 / 3) < 0.03
    x = draw("multiscale")
    rad, angle = polar(x)
    ring = rad > 1.6
    assert abs(ring.float().mean() - 0.4) < 0.03
    assert bool(((angle[ring] - math.pi / 4).abs() > math.radians(35)).all())


def test_holes_are_empty_and_the_rest_uniform():
    x = draw("holes")
    d = torch.cdist(x.double(), torch.tensor(HOLES, dtype=torch.float64))
    assert bool((d > HOLE_RADIUS).all())
    assert bool((x.abs() <= 2).all())
    quadrants = torch.stack([(x[:, 0] > 0) & (x[:, 1] > 0), (x[:, 0] < 0) & (x[:, 1] > 0),
                             (x[:, 0] < 0) & (x[:, 1] < 0), (x[:, 0] > 0) & (x[:, 1] < 0)]).float().mean(dim=1)
    assert bool(((quadrants - 0.25).abs() < 0.03).all())


def test_thin_structures_are_about_001_wide():
    x = draw("thin").double()
    rad, _ = polar(x)
    on_circle = (rad - 1.7).abs() < 0.05
    assert abs(on_circle.float().mean() - 0.65) < 0.03
    assert (rad[on_circle] - 1.7).std() < 0.007
    rest = x[~on_circle]
    across = torch.minimum((rest[:, 0] - rest[:, 1]).abs(), (rest[:, 0] + rest[:, 1]).abs()) / math.sqrt(2)
    assert across.std() < 0.007 and across.max() < 0.04


def test_gaussian_scales():
    x = draw("gmm_scales", n=20000).double()
    for (cx, cy), std in GMM_SCALES[1:]:
        near = x[(x - torch.tensor([cx, cy], dtype=torch.float64)).norm(dim=1) < 5 * std]
        if std <= 0.04:  # the tiny blobs stand clear of the wide Gaussian
            assert abs(near.std(dim=0).mean() - std) < 0.15 * std
    x = draw("gmm_grid")
    assert ((x - x.round()).norm(dim=1) < 0.3).float().mean() > 0.99
    assert len(torch.unique(x.round(), dim=0)) == 25


def test_members_differ_from_each_other():
    # energy distance between two draws of one member is far below that between members (the
    # closest pair, rings against thin, is about 4x the largest same-member value at 4000 points)
    names = list(FAMILY)
    same = max(energy_distance(draw(n, 0), draw(n, 1)) for n in names)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert energy_distance(draw(a, 0), draw(b, 1)) > 3 * same, (a, b)
