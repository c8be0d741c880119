import math

import pytest
import torch

from soflow.data.augment import AUGMENT_DIM, AugmentPipe, apply_geometric, rotate2d, scale2d, translate2d


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def disc(size=48, radius=8.0, dtype=torch.float64):
    """Anti-aliased centred disc in [-1, 1] (background -1), shape [1, 1, size, size]."""
    c = (size - 1) / 2
    y, x = torch.meshgrid(torch.arange(size, dtype=dtype), torch.arange(size, dtype=dtype), indexing="ij")
    inside = (radius + 0.5 - ((x - c) ** 2 + (y - c) ** 2).sqrt()).clamp(0, 1)
    return (inside * 2 - 1)[None, None]


def moments(img):
    """Mass, centroid (x, y) and 2x2 covariance of (img + 1) / 2 for each image [N, 1, H, W]."""
    m = (img[:, 0] + 1) / 2
    H, W = m.shape[-2:]
    y, x = torch.meshgrid(torch.arange(H, dtype=m.dtype), torch.arange(W, dtype=m.dtype), indexing="ij")
    mass = m.sum((1, 2))
    mx, my = (m * x).sum((1, 2)) / mass, (m * y).sum((1, 2)) / mass
    dx, dy = x - mx[:, None, None], y - my[:, None, None]
    cxx, cyy, cxy = [(m * a * b).sum((1, 2)) / mass for a, b in ((dx, dx), (dy, dy), (dx, dy))]
    cov = torch.stack([torch.stack([cxx, cxy], -1), torch.stack([cxy, cyy], -1)], -2)
    return mass, mx, my, cov


def only(**kw):
    """Pipe with p=1 and every augmentation off except those given."""
    return AugmentPipe(**{"p": 1.0, "xflip": 0, "scale": 0, "aniso": 0, "translate_frac": 0, **kw})


def test_label_shape_and_order():
    x = torch.rand(16, 3, 8, 8) * 2 - 1
    _, lab = AugmentPipe()(x, gen())
    assert lab.shape == (16, AUGMENT_DIM) == (16, 6) and lab.dtype == torch.float32
    for pipe, cols in [(only(xflip=1), [0]), (only(scale=1), [1]), (only(aniso=1, aniso_rotate_prob=1), [2, 3]),
                       (only(translate_frac=1), [4, 5])]:
        _, lab = pipe(x, gen(1))
        nonzero = (lab != 0).any(0).nonzero().squeeze(1).tolist()
        assert nonzero == cols, (pipe.__dict__, nonzero)


def test_p0_is_identity():
    x = torch.rand(16, 3, 8, 8) * 2 - 1
    out, lab = AugmentPipe(p=0, xflip=0)(x, gen())
    assert torch.equal(out, x) and not lab.any()
    out, lab = AugmentPipe(p=0)(x, gen())  # xflip * p = 0 as well
    assert torch.equal(out, x) and not lab.any()


def test_xflip_only():
    x = torch.rand(64, 3, 8, 8) * 2 - 1
    out, lab = AugmentPipe(scale=0, aniso=0, translate_frac=0)(x, gen())
    f = lab[:, 0] == 1
    assert set(lab[:, 0].tolist()) == {0.0, 1.0} and not lab[:, 1:].any()
    assert torch.equal(out[f], x[f].flip(3)) and torch.equal(out[~f], x[~f])
    assert not torch.equal(out[f], x[f])


def test_default_pipe_untransformed_samples_bit_identical():
    x = torch.rand(64, 3, 16, 16) * 2 - 1
    out, lab = AugmentPipe(p=0.5)(x, gen(3))
    flipped = torch.where(lab[:, 0, None, None, None] == 1, x.flip(3), x)
    geo = (lab[:, 1:] != 0).any(1)
    assert 5 < geo.sum() < 59
    assert torch.equal(out[~geo], flipped[~geo])
    diff = (out[geo] - flipped[geo]).abs().flatten(1).amax(1)
    assert (diff > 1e-3).all()
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 5e-5)])
def test_identity_matrix_resamples_to_input(dtype, tol):
    # Exercises the sym6 up/down filters and the coordinate chain: any half-pixel slip would blur.
    x = torch.randn(2, 3, 16, 12, generator=gen(), dtype=dtype)
    out = apply_geometric(x, torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
    assert out.dtype == dtype and out.shape == x.shape
    assert (out - x).abs().max() < tol


def test_integer_translation_moves_whole_pixels():
    x = torch.randn(1, 2, 16, 16, generator=gen(), dtype=torch.float64)
    out = apply_geometric(x, translate2d(-3.0, 2.0)[None])  # content moves right 3, up 2
    assert torch.allclose(out[..., :-2, 3:], x[..., 2:, :-3], atol=1e-9)
    assert not torch.allclose(out[..., :-2, 3:], x[..., :-2, 3:], atol=1e-2)


@pytest.mark.parametrize("w", [-2.0, 1.5, 2.5])
def test_scale_grows_disc_area(w):
    s = 2 ** (w * 0.2)
    mass0 = moments(disc())[0]
    mass1 = moments(apply_geometric(disc(), scale2d(1 / s, 1 / s)[None]))[0]
    assert mass1 / mass0 == pytest.approx(4 ** (w * 0.2), rel=0.005)


def test_pipe_scale_matches_labels():
    x = disc().expand(12, 1, -1, -1)
    out, lab = only(scale=1)(x, gen(2))
    ratio = moments(out)[0] / moments(x)[0]
    assert torch.allclose(ratio, 4 ** (lab[:, 1].double() * 0.2), rtol=0.005)


def test_general_linear_map_moves_covariance():
    # out(p) = in(G_inv p) means the content is mapped by G = G_inv^-1, so cov_out = G cov_in G^T.
    G_inv = rotate2d(-0.6) @ scale2d(2 ** -0.3, 2 ** 0.3) @ rotate2d(0.6)
    out = apply_geometric(disc(radius=6.0), G_inv[None])
    G = torch.linalg.inv(G_inv)[:2, :2]
    cov_in, cov_out = moments(disc(radius=6.0))[3][0], moments(out)[3][0]
    assert torch.allclose(cov_out, G @ cov_in @ G.T, atol=0.015 * cov_in[0, 0])
    assert cov_out[0, 1].abs() > 0.1 * cov_in[0, 0]  # the map really is non-diagonal


def test_aniso_params_match_labels():
    prm = only(aniso=1, aniso_rotate_prob=1).sample_params(200, 32, 32, gen())
    A = prm.G_inv[:, :2, :2]
    w = torch.hypot(prm.labels[:, 2], prm.labels[:, 3]).double()
    assert torch.allclose(torch.linalg.det(A), torch.ones(200, dtype=A.dtype))
    assert torch.allclose(A, A.transpose(1, 2), atol=1e-12)
    ev = torch.linalg.eigvalsh(A)
    assert torch.allclose(ev[:, 1], 2 ** (w * 0.2), rtol=1e-5)
    # EDM composes rotate(-r) @ aniso @ rotate(r): the scaled axis of G_inv is (cos r, -sin r).
    v = torch.stack([prm.labels[:, 2], -prm.labels[:, 3]], 1).double()
    Av = (A @ v[:, :, None])[:, :, 0]
    assert torch.allclose(Av[:, 0] * v[:, 1] - Av[:, 1] * v[:, 0], torch.zeros(200, dtype=A.dtype), atol=1e-6)
    assert (v[:, 1].abs() > 0.1 * w).sum() > 50  # the axes are genuinely rotated


def test_matrix_conventions():
    p = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(rotate2d(math.pi / 2) @ p, torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64), atol=1e-12)
    assert torch.equal(translate2d(2.0, -3.0) @ p, torch.tensor([3.0, -3.0, 1.0], dtype=torch.float64))
    assert torch.equal(scale2d(2.0, 5.0) @ torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64),
                       torch.tensor([2.0, 5.0, 1.0], dtype=torch.float64))


def test_pipe_translation_matches_labels():
    size, std = 64, 0.125
    c = (size - 1) / 2
    r = torch.arange(size, dtype=torch.float64)
    y, x = torch.meshgrid(r, r, indexing="ij")
    blob = (2 * torch.exp(-((x - c) ** 2 + (y - c) ** 2) / (2 * 2.0 ** 2)) - 1)[None, None].expand(16, 1, -1, -1)
    out, lab = only(translate_frac=1)(blob, gen(4))
    _, mx, my, _ = moments(out)
    tx, ty = lab[:, 4].double() * size * std, lab[:, 5].double() * size * std
    ok = (tx.abs() < 20) & (ty.abs() < 20)  # blob stays clear of the reflecting border
    assert ok.sum() >= 10
    assert torch.allclose(mx[ok] - c, tx[ok], atol=0.02) and torch.allclose(my[ok] - c, ty[ok], atol=0.02)


def test_frequencies():
    n, p = 100_000, 0.12
    lab = AugmentPipe(p=p).sample_params(n, 32, 32, gen()).labels
    tol = 5 * math.sqrt(p * (1 - p) / n)
    assert abs((lab[:, 0] == 1).double().mean() - 0.5) < 5 * math.sqrt(0.25 / n)
    for cols in ([1], [2, 3], [4, 5]):
        assert abs((lab[:, cols] != 0).any(1).double().mean() - p) < tol
    assert torch.equal(lab[:, 4] != 0, lab[:, 5] != 0)  # one gate for both translation axes
    w = lab[lab[:, 1] != 0, 1]
    assert abs(w.std() - 1) < 0.03 and abs(w.mean()) < 0.03
    # aniso axis rotated for about half the samples
    aniso = lab[:, 2] != 0
    assert abs((lab[aniso, 3] != 0).double().mean() - 0.5) < 0.02


def test_reproducible_with_generator():
    x = torch.rand(32, 3, 16, 16) * 2 - 1
    a, la = AugmentPipe(p=0.5)(x, gen(7))
    b, lb = AugmentPipe(p=0.5)(x, gen(7))
    _, lc = AugmentPipe(p=0.5)(x, gen(8))
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(la, lc)


def test_float32_and_float64_inputs():
    x = torch.rand(16, 3, 16, 16, dtype=torch.float64) * 2 - 1
    o64, l64 = AugmentPipe(p=0.5)(x, gen(5))
    o32, l32 = AugmentPipe(p=0.5)(x.float(), gen(5))
    assert o64.dtype == torch.float64 and o32.dtype == torch.float32
    assert torch.equal(l32, l64) and (l64[:, 1:] != 0).any()
    assert torch.allclose(o32.double(), o64, atol=5e-5)
