"""Noising paths and solution parameterizations.

Time runs from data (t = 0) to noise (t = 1).  A noising path interpolates

    x_t = alpha(t) x0 + beta(t) x1,        x0 ~ data, x1 ~ N(0, I),          (1)

and its conditional velocity is v_t = alpha'(t) x0 + beta'(t) x1.

A parameterization writes the solution function of the probability-flow ODE as

    f(x_t, t, s) = a(t, s) x_t + b(t, s) F(x_t, t, s),    a(t, t) = 1, b(t, t) = 0,   (2)

so that the boundary condition f(x, t, t) = x holds for any network F.  The model
velocity is the s-derivative of (2) at s = t:

    v(x, t) = d_s a(t, t) x + d_s b(t, t) F(x, t, t).                               (3)

All functions take tensors of times (any broadcastable shape) and return tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import ConfigError
from .protocols import NoisingPath

HALF_PI = math.pi / 2


class LinearPath:
    """alpha = 1 - t, beta = t (rectified-flow / OT path)."""

    name = "linear"

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - t

    def beta(self, t: Tensor) -> Tensor:
        return t

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -1.0)

    def d_beta(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)


class TrigPath:
    """alpha = cos(pi t / 2), beta = sin(pi t / 2) (variance-preserving trigonometric path)."""

    name = "trig"

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(HALF_PI * t)

    def beta(self, t: Tensor) -> Tensor:
        return torch.sin(HALF_PI * t)

    def d_alpha(self, t: Tensor) -> Tensor:
        return -HALF_PI * torch.sin(HALF_PI * t)

    def d_beta(self, t: Tensor) -> Tensor:
        return HALF_PI * torch.cos(HALF_PI * t)


class EulerParameterization:
    """a = 1, b = s - t: f = x + (s - t) F, an Euler step with a learned velocity."""

    name = "euler"

    def a(self, t: Tensor, s: Tensor) -> Tensor:
        return torch.ones_like(s - t)

    def b(self, t: Tensor, s: Tensor) -> Tensor:
        return s - t

    def dt_a(self, t: Tensor, s: Tensor) -> Tensor:
        return torch.zeros_like(s - t)

    def ds_a(self, t: Tensor, s: Tensor) -> Tensor:
        return torch.zeros_like(s - t)

    def dt_b(self, t: Tensor, s: Tensor) -> Tensor:
        return torch.full_like(s - t, -1.0)

    def ds_b(self, t: Tensor, s: Tensor) -> Tensor:
        return torch.ones_like(s - t)


class TrigParameterization:
    """a = cos(pi (s - t) / 2), b = sin(pi (s - t) / 2): a rotation by the time gap."""

    name = "trig"

    def a(self, t: Tensor, s: Tensor) -> Tensor:
        return torch.cos(HALF_PI * (s - t))

    def b(self, t: Tensor, s: Tensor) -> Tensor:
        return torch.sin(HALF_PI * (s - t))

    def dt_a(self, t: Tensor, s: Tensor) -> Tensor:
        return HALF_PI * torch.sin(HALF_PI * (s - t))

    def ds_a(self, t: Tensor, s: Tensor) -> Tensor:
        return -HALF_PI * torch.sin(HALF_PI * (s - t))

    def dt_b(self, t: Tensor, s: Tensor) -> Tensor:
        return -HALF_PI * torch.cos(HALF_PI * (s - t))

    def ds_b(self, t: Tensor, s: Tensor) -> Tensor:
        return HALF_PI * torch.cos(HALF_PI * (s - t))


PATHS = {"linear": LinearPath, "trig": TrigPath}
PARAMETERIZATIONS = {"euler": EulerParameterization, "trig": TrigParameterization}


def _lookup(table: dict, name: str, what: str):
    key = str(name).lower()
    if key not in table:
        raise ConfigError(f"unknown {what} {name!r}; choose one of {', '.join(sorted(table))}")
    return table[key]()


def make_path(name: str) -> LinearPath | TrigPath:
    """The noising path `name` (linear or trig)."""
    return _lookup(PATHS, name, "noising path")


def make_parameterization(name: str) -> EulerParameterization | TrigParameterization:
    """The parameterization `name` (euler or trig)."""
    return _lookup(PARAMETERIZATIONS, name, "parameterization")


def interpolate(path: NoisingPath, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """Eq. (1): the noisy sample x_t; t has shape [B]."""
    t = expand_as_rows(t, x0)
    return path.alpha(t) * x0 + path.beta(t) * x1


def conditional_velocity(path: NoisingPath, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """d x_t / d t along (1) for a fixed pair (x0, x1)."""
    t = expand_as_rows(t, x0)
    return path.d_alpha(t) * x0 + path.d_beta(t) * x1


def expand_as_rows(v: Tensor, x: Tensor) -> Tensor:
    """View a per-row vector [B] so that it broadcasts against x [B, ...]."""
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1)))


def mean_per_row(x: Tensor) -> Tensor:
    """Mean over every axis but the first: a per-row loss [B] from per-element errors [B, ...]."""
    return x.reshape(x.shape[0], -1).mean(dim=1)
