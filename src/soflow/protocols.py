"""The duck-typed contracts between soflow's parts, written down as Protocols (for readers and type
checkers; nothing checks them at run time)."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn


class NoisingPath(Protocol):
    """x_t = alpha(t) x0 + beta(t) x1 with x0 data and x1 noise; alpha(0) = beta(1) = 1."""

    def alpha(self, t: Tensor) -> Tensor: ...
    def beta(self, t: Tensor) -> Tensor: ...
    def d_alpha(self, t: Tensor) -> Tensor: ...
    def d_beta(self, t: Tensor) -> Tensor: ...


class Parameterization(Protocol):
    """f(x_t, t, s) = a(t, s) x_t + b(t, s) F(x_t, t, s) with a(t, t) = 1, b(t, t) = 0."""

    def a(self, t: Tensor, s: Tensor) -> Tensor: ...
    def b(self, t: Tensor, s: Tensor) -> Tensor: ...
    def dt_a(self, t: Tensor, s: Tensor) -> Tensor: ...
    def ds_a(self, t: Tensor, s: Tensor) -> Tensor: ...
    def dt_b(self, t: Tensor, s: Tensor) -> Tensor: ...
    def ds_b(self, t: Tensor, s: Tensor) -> Tensor: ...


class Dataset(Protocol):
    """What `soflow.data.make_dataset` returns.  Besides these, a dataset has either
    `batch(seed, position, rank, world, n) -> (x0, labels)` (in memory or synthetic) or
    `__len__` and `__getitem__` (read by DataLoader workers)."""

    sample_shape: tuple[int, ...]
    num_classes: int  # 0: unconditional


class Objective(Protocol):
    """A training loss (soflow.objectives); its dataclass fields are the method's config section."""

    cfg_drop_rate: float  # > 0: labels are dropped to the null class, so the network needs that row

    def __call__(self, flow: nn.Module, x0: Tensor, labels: Tensor | None = None, step: int = 0,
                 augment_labels: Tensor | None = None, net: nn.Module | None = None) -> tuple[Tensor, dict]: ...
