"""SolutionFlow: a network F wrapped into the solution function f(x, t, s) and velocity v(x, t)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .paths import expand_as_rows, make_parameterization, make_path
from .protocols import NoisingPath, Parameterization


class SolutionFlow(nn.Module):
    """f(x_t, t, s) = a(t, s) x_t + b(t, s) F(x_t, t, s)  (paths.py, eq. 2).

    `net` is any module called as net(x, t, s, labels, augment_labels) with per-row times [B].
    `path` (linear | trig) is the noising path used for training targets and re-noising;
    `parameterization` (euler | trig) fixes a and b.
    """

    def __init__(self, net: nn.Module, path: str = "linear", parameterization: str = "euler"):
        super().__init__()
        self.net = net
        self.path: NoisingPath = make_path(path)
        self.param: Parameterization = make_parameterization(parameterization)

    # -- coefficient math on a given network output (no validation, no host sync) --

    def solution_from(self, x: Tensor, t: Tensor, s: Tensor, out: Tensor) -> Tensor:
        """Eq. (2) for a network output `out` = F(x, t, s)."""
        t, s = expand_as_rows(t, x), expand_as_rows(s, x)
        return self.param.a(t, s) * x + self.param.b(t, s) * out

    def velocity_from(self, x: Tensor, t: Tensor, out: Tensor) -> Tensor:
        """Eq. (3) for a network output `out` = F(x, t, t)."""
        t = expand_as_rows(t, x)
        return self.param.ds_a(t, t) * x + self.param.ds_b(t, t) * out

    # -- user-facing calls: validated --

    @property
    def num_classes(self) -> int:
        return getattr(self.net, "num_classes", 0) or 0

    def forward(self, x: Tensor, t: float | Tensor, s: float | Tensor, labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        """f(x, t, s): the state at time s of the ODE trajectory through x at time t (s <= t)."""
        t, s = self._times(x, t, "t"), self._times(x, s, "s")
        if bool((s > t).any()):
            raise ValueError("s > t: the solution maps a state at time t to an earlier time s <= t")
        self._check_labels(labels)
        return self.solution_from(x, t, s, self.net(x, t, s, labels, augment_labels))

    solution = forward

    def velocity(self, x: Tensor, t: float | Tensor, labels: Tensor | None = None,
                 augment_labels: Tensor | None = None) -> Tensor:
        """v(x, t) = d_s f(x, t, s) at s = t."""
        t = self._times(x, t, "t")
        self._check_labels(labels)
        return self.velocity_from(x, t, self.net(x, t, t, labels, augment_labels))

    def _times(self, x: Tensor, value, name: str) -> Tensor:
        v = torch.as_tensor(value, dtype=x.dtype, device=x.device)
        if v.dim() == 0:
            v = v.expand(x.shape[0])
        if v.shape != (x.shape[0],):
            raise ValueError(f"{name} must be a scalar or have shape [{x.shape[0]}], got {tuple(v.shape)}")
        if bool(((v < 0) | (v > 1)).any()):
            raise ValueError(f"{name} must lie in [0, 1]")
        return v

    def _check_labels(self, labels: Tensor | None) -> None:
        if labels is None:
            return
        if not self.num_classes:
            raise ValueError("labels given to an unconditional network; pass labels=None")
        if labels.dtype not in (torch.int32, torch.int64) or bool(((labels < 0) | (labels > self.num_classes)).any()):
            raise ValueError(f"labels must be integer class ids in [0, {self.num_classes}] "
                             f"({self.num_classes} is the null class)")
