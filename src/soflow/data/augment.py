"""EDM data augmentation (Karras et al. 2022, NVlabs/edm ``training/augment.py``), restricted to the
settings SoFlow uses on CIFAR-10: ``AugmentPipe(p=0.12, xflip=1e8, yflip=0, scale=1, rotate_frac=0,
aniso=1, translate_frac=1)`` with EDM's default standard deviations.

Per sample, in this order:

* x-flip with probability 0.5 (the flip is "enabled" with probability min(xflip * p, 1) = 1);
* isotropic scaling by 2^(w * scale_std), w ~ N(0, 1) with probability p, else 0;
* anisotropic scaling by 2^(w * aniso_std) along one axis and its inverse along the other, the axes
  rotated by r ~ U[-pi, pi) with probability ``aniso_rotate_prob`` (EDM: 0.5), else r = 0;
  w ~ N(0, 1) with probability p, else 0;
* translation by (wx * W, wy * H) * translate_std pixels, (wx, wy) ~ N(0, 1) with probability p
  (one draw for both axes), else 0.

The labels are ``[xflip, scale_w, aniso_w * cos r, aniso_w * sin r, wx, wy]`` (float32, zero for a
disabled augmentation).  As in EDM, the aniso labels do not tell (w, r) from (-w, r + pi).

Resampling follows EDM: reflection padding, 2x upsampling with the sym6 wavelet low-pass filter,
bilinear ``grid_sample`` at 2x, sym6 downsampling, crop.  Deliberate differences from EDM:

* random numbers are drawn on the CPU (from ``generator`` if given) and moved to the images' device;
* the label vector always has ``AUGMENT_DIM`` = 6 columns;
* samples without a geometric transform skip resampling and come back bit-identical (EDM resamples
  them too, which is the identity up to float rounding).  The padding margin is computed as if the
  batch held such an identity sample, which EDM's batches practically always do;
* matrices are composed in float64 and then cast to the compute dtype (float64 for float64 images,
  float32 otherwise).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

AUGMENT_DIM = 6

# Low-pass decomposition filter of the Symlet-6 wavelet (orthonormal; taps sum to sqrt(2)).
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
_BORDER = len(SYM6) // 4  # extra output pixels kept on each side while filtering (3)
_CONV_PAD = (len(SYM6) - 2) // 2  # makes the 2x up/down filters map n <-> 2n samples (5)


def _matrices(*entries) -> Tensor:
    """Stack nine row-major entries (scalars or [n] tensors) into float64 matrices [..., 3, 3]."""
    t = torch.broadcast_tensors(*(torch.as_tensor(e, dtype=torch.float64) for e in entries))
    return torch.stack(t, dim=-1).reshape(*t[0].shape, 3, 3)


def translate2d(tx: float | Tensor, ty: float | Tensor) -> Tensor:
    """Homogeneous 2-D matrix mapping (x, y) to (x + tx, y + ty)."""
    return _matrices(1, 0, tx, 0, 1, ty, 0, 0, 1)


def scale2d(sx: float | Tensor, sy: float | Tensor) -> Tensor:
    """Homogeneous 2-D matrix mapping (x, y) to (sx * x, sy * y)."""
    return _matrices(sx, 0, 0, 0, sy, 0, 0, 0, 1)


def rotate2d(theta: float | Tensor) -> Tensor:
    """Homogeneous 2-D matrix rotating (x, y) by angle theta (radians) from the x axis towards y."""
    theta = torch.as_tensor(theta, dtype=torch.float64)
    c, s = torch.cos(theta), torch.sin(theta)
    return _matrices(c, -s, 0, s, c, 0, 0, 0, 1)


def _upsample2x(x: Tensor) -> Tensor:
    """[n, c, h, w] -> [n, c, 2h, 2w]: zero insertion then the sym6 filter along each axis, i.e. the
    adjoint of `_downsample2x` (so downsampling undoes it exactly, away from the borders)."""
    n, c, h, w = x.shape
    f = torch.tensor(SYM6, dtype=x.dtype, device=x.device)
    y = F.conv_transpose2d(x.reshape(n * c, 1, h, w), f.view(1, 1, 1, -1), stride=(1, 2), padding=(0, _CONV_PAD))
    y = F.conv_transpose2d(y, f.view(1, 1, -1, 1), stride=(2, 1), padding=(_CONV_PAD, 0))
    return y.reshape(n, c, 2 * h, 2 * w)


def _downsample2x(x: Tensor) -> Tensor:
    """[n, c, h, w] -> [n, c, h/2, w/2]: sym6 low-pass filter and keep every second sample, per axis."""
    n, c, h, w = x.shape
    f = torch.tensor(SYM6, dtype=x.dtype, device=x.device)
    y = F.conv2d(x.reshape(n * c, 1, h, w), f.view(1, 1, 1, -1), stride=(1, 2), padding=(0, _CONV_PAD))
    y = F.conv2d(y, f.view(1, 1, -1, 1), stride=(2, 1), padding=(_CONV_PAD, 0))
    return y.reshape(n, c, h // 2, w // 2)


def apply_geometric(images: Tensor, G_inv: Tensor) -> Tensor:
    """Resample images [n, C, H, W] (float32/float64) so that out(p) = in(G_inv[i] @ p), where p are
    homogeneous pixel coordinates (x right, y down) relative to the image centre.  Outside the image
    the input is reflected.  Anti-aliased as in EDM (sym6 2x up, bilinear at 2x, sym6 down)."""
    n, C, H, W = images.shape
    G = G_inv.detach().to("cpu", torch.float64)

    # Reflection padding needed on each side so that every sampled point, plus the filter support,
    # lands on padded pixels; at least 2 * _BORDER (what an identity transform needs), at most size - 1.
    cx, cy = (W - 1) / 2, (H - 1) / 2
    corners = G @ torch.tensor([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1.0, 1, 1, 1]], dtype=torch.float64)

    def margin(extent: float, centre: float, size: int) -> int:
        return math.ceil(min(max(extent + 2 * _BORDER - centre, 2 * _BORDER), size - 1))

    mx0, mx1 = margin(-corners[:, 0].min().item(), cx, W), margin(corners[:, 0].max().item(), cx, W)
    my0, my1 = margin(-corners[:, 1].min().item(), cy, H), margin(corners[:, 1].max().item(), cy, H)
    x = _upsample2x(F.pad(images, [mx0, mx1, my0, my1], mode="reflect"))

    # Output grid: the image plus _BORDER pixels per side, at 2x.  Chain of coordinate maps, right to
    # left: normalized output -> 2x output pixels -> 1x output pixels -> G -> 1x padded input pixels
    # -> 2x input pixels -> normalized input (all pixel coordinates centred).
    Ho, Wo = 2 * (H + 2 * _BORDER), 2 * (W + 2 * _BORDER)
    theta = (scale2d(2 / x.shape[3], 2 / x.shape[2]) @ translate2d(-0.5, -0.5) @ scale2d(2, 2)
             @ translate2d((mx0 - mx1) / 2, (my0 - my1) / 2) @ G
             @ scale2d(0.5, 0.5) @ translate2d(0.5, 0.5) @ scale2d(Wo / 2, Ho / 2))
    theta = theta[:, :2, :].to(images.dtype).to(images.device)
    grid = F.affine_grid(theta, [n, C, Ho, Wo], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _downsample2x(x)[:, :, _BORDER:-_BORDER, _BORDER:-_BORDER]


class AugmentParams(NamedTuple):
    """The augmentation drawn for each image of a batch."""

    flip: Tensor    # [N] bool, flip horizontally
    G_inv: Tensor   # [N, 3, 3] float64, output -> input pixel coordinates (centred)
    active: Tensor  # [N] bool, some geometric parameter is non-zero
    labels: Tensor  # [N, AUGMENT_DIM] float32


class AugmentPipe:
    """EDM augmentation pipeline: x-flip, isotropic scale, anisotropic scale, fractional translation.

    `pipe(images, generator)` takes images [N, C, H, W] in [-1, 1] and returns (images, labels [N, 6]).
    """

    def __init__(self, p: float = 0.12, xflip: float = 1e8, scale: float = 1.0, aniso: float = 1.0,
                 translate_frac: float = 1.0, scale_std: float = 0.2, aniso_std: float = 0.2,
                 translate_std: float = 0.125, aniso_rotate_prob: float = 0.5):
        self.p, self.xflip, self.scale, self.aniso = map(float, (p, xflip, scale, aniso))
        self.translate_frac = float(translate_frac)
        self.scale_std, self.aniso_std, self.translate_std = map(float, (scale_std, aniso_std, translate_std))
        self.aniso_rotate_prob = float(aniso_rotate_prob)

    def sample_params(self, n: int, height: int, width: int, generator: torch.Generator | None = None) -> AugmentParams:
        """Draw the augmentation of n images of size height x width, on the CPU, in EDM's order."""
        def rand(*shape):
            return torch.rand(shape, generator=generator)

        def gated(w: Tensor, prob: float, gate_shape) -> Tensor:
            return torch.where(rand(*gate_shape) < prob, w, torch.zeros_like(w))

        labels = torch.zeros(n, AUGMENT_DIM)
        flip = torch.zeros(n, dtype=torch.bool)
        active = torch.zeros(n, dtype=torch.bool)
        G_inv = torch.eye(3, dtype=torch.float64).expand(n, 3, 3)

        if self.xflip > 0:
            w = gated(torch.randint(2, (n,), generator=generator), self.xflip * self.p, (n,))
            flip, labels[:, 0] = w == 1, w

        if self.scale > 0:
            w = gated(torch.randn(n, generator=generator), self.scale * self.p, (n,))
            s = torch.exp2(w.double() * self.scale_std)
            G_inv = G_inv @ scale2d(1 / s, 1 / s)
            labels[:, 1], active = w, active | (w != 0)

        if self.aniso > 0:
            w = torch.randn(n, generator=generator)
            r = (rand(n) * 2 - 1) * math.pi
            w = gated(w, self.aniso * self.p, (n,))
            r = gated(r, self.aniso_rotate_prob, (n,))
            s, rd = torch.exp2(w.double() * self.aniso_std), r.double()
            G_inv = G_inv @ rotate2d(-rd) @ scale2d(1 / s, s) @ rotate2d(rd)
            labels[:, 2], labels[:, 3], active = w * r.cos(), w * r.sin(), active | (w != 0)

        if self.translate_frac > 0:
            w = gated(torch.randn(2, n, generator=generator), self.translate_frac * self.p, (1, n))
            t = w.double() * self.translate_std
            G_inv = G_inv @ translate2d(-t[0] * width, -t[1] * height)
            labels[:, 4], labels[:, 5], active = w[0], w[1], active | (w != 0).any(0)

        return AugmentParams(flip, G_inv.contiguous(), active, labels)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        n, _, h, w = images.shape
        prm = self.sample_params(n, h, w, generator)
        flip = prm.flip.to(images.device)
        out = torch.where(flip[:, None, None, None], images.flip(3), images)
        if prm.active.any():
            idx = prm.active.nonzero().squeeze(1)
            idx_dev = idx.to(images.device)
            dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
            out[idx_dev] = apply_geometric(out[idx_dev].to(dtype), prm.G_inv[idx]).to(out.dtype)
        return out, prm.labels.to(images.device)


__all__ = ["AUGMENT_DIM", "AugmentParams", "AugmentPipe", "apply_geometric", "rotate2d", "scale2d", "translate2d"]
