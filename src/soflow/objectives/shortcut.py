"""Shortcut models (Frans, Hafner, Levine, Abbeel 2024, "One Step Diffusion via Shortcut Models")
as a baseline on the soflow networks.

A shortcut model conditions on the step size d and jumps x_t -> x_{t-d} in one evaluation.  In a
SolutionFlow that jump is the solution f(x_t, t, t - d), so no new network input is needed: the
second time s = t - d carries the step size (with the Euler parameterization F is the paper's
shortcut s(x_t, t, d)).  Two losses share one forward with grad:

    flow matching (d = 0):   || v(x_t, t) - (x1 - x0) ||^2               (paper eq. 5)
    self-consistency:        || (f(x_t, t, t - 2d) - sg f(f(x_t, t, t - d), t - d, t - 2d)) / 2d ||^2

the second saying that one step of size 2d lands where two chained steps of size d land
(paper eq. 6, written for any parameterization and divided by 2d to be in velocity units).
Step sizes are dyadic, d = 2^-k for k = 1 .. log2(max_steps), and t lies on the grid of d with
t - 2d >= 0.  Sample with chained solution steps: `soflow.sample(flow, ..., mode="chain")`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..paths import conditional_velocity, expand_as_rows, interpolate, mean_per_row
from ..solution import SolutionFlow
from . import checks
from .scales import drop_labels


@dataclass
class ShortcutLoss:
    """Callable loss: `loss, stats = ShortcutLoss(...)(flow, x0, labels, step)`.

    consistency_ratio: share of each batch given to self-consistency (the last rows; paper: 1/4)
    max_steps:         M, the finest step 1 / M (a power of 2; paper: 128)
    cfg_drop_rate:     share of labels replaced by the null class (for sampling-time guidance)
    """

    consistency_ratio: float = 0.25
    max_steps: int = 128
    cfg_drop_rate: float = 0.0

    def __post_init__(self):
        checks.in_unit_interval("consistency_ratio", self.consistency_ratio)
        checks.in_unit_interval("cfg_drop_rate", self.cfg_drop_rate)
        if not isinstance(self.max_steps, int) or self.max_steps < 2 or self.max_steps & (self.max_steps - 1):
            raise ValueError(f"max_steps: must be a power of 2 from 2 up, got {self.max_steps!r}")

    def sample_steps(self, n: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """(t, d) for n consistency rows: d = 2^-k, k uniform in 1 .. log2(M); t = j d with j
        uniform in 2 .. 1/d, so that both chained steps stay inside [0, 1]."""
        levels = int(math.log2(self.max_steps))
        k = torch.randint(1, levels + 1, (n,), device=device)
        d = 2.0 ** -k.double()
        j = 2 + torch.floor(torch.rand(n, device=device, dtype=torch.float64) * (1 / d - 1))
        return (j * d).float(), d.float()

    def __call__(self, flow: SolutionFlow, x0: Tensor, labels: Tensor | None = None, step: int = 0,
                 augment_labels: Tensor | None = None, net: nn.Module | None = None) -> tuple[Tensor, dict]:
        b, dev = x0.shape[0], x0.device
        n_c = int(self.consistency_ratio * b)
        labels, _ = drop_labels(labels, self.cfg_drop_rate, flow.num_classes, dev)
        x1 = torch.randn_like(x0)
        t_c, d = self.sample_steps(n_c, dev)
        t_v = torch.rand(b - n_c, device=dev)
        return self.loss_on(flow, x0, x1, t_v, t_c, d, labels, augment_labels, net)

    def loss_on(self, flow: SolutionFlow, x0: Tensor, x1: Tensor, t_v: Tensor, t_c: Tensor, d: Tensor,
                labels: Tensor | None = None, augment_labels: Tensor | None = None,
                net: nn.Module | None = None) -> tuple[Tensor, dict]:
        """The loss for given data, noise, flow-matching times t_v (the first rows) and consistency
        times and step sizes (t_c, d) (the last rows); labels already dropped.  One forward with grad."""
        b, n_v, dtype = x0.shape[0], len(t_v), x0.dtype
        net = flow.net if net is None else net
        t_c, d = t_c.to(dtype), d.to(dtype)
        t = torch.cat([t_v.to(dtype), t_c])
        s = torch.cat([t_v.to(dtype), t_c - 2 * d])
        x_t = interpolate(flow.path, x0, x1, t)
        out = net(x_t, t, s, labels, augment_labels).to(dtype)
        stats, total = {}, out.new_zeros(())
        if n_v:
            v_pred = flow.velocity_from(x_t[:n_v], t_v.to(dtype), out[:n_v])
            mse = mean_per_row((v_pred - conditional_velocity(flow.path, x0[:n_v], x1[:n_v], t[:n_v])) ** 2)
            stats["velocity_mse"] = mse.detach().mean()
            total = total + mse.sum() / b
        if n_v < b:
            rows = slice(n_v, b)
            y = None if labels is None else labels[rows]
            aug = None if augment_labels is None else augment_labels[rows]
            target = self._two_steps(flow, net, x_t[rows], t_c, d, y, aug)
            pred = flow.solution_from(x_t[rows], t_c, s[rows], out[rows])
            mse = mean_per_row(((pred - target) / expand_as_rows(2 * d, pred)) ** 2)
            stats["consistency_mse"] = mse.detach().mean()
            total = total + mse.sum() / b
        return total, stats

    @torch.no_grad()
    def _two_steps(self, flow: SolutionFlow, net: nn.Module, x: Tensor, t: Tensor, d: Tensor, labels, aug) -> Tensor:
        """sg f(f(x, t, t - d), t - d, t - 2d): the self-consistency target."""
        for _ in range(2):
            x = flow.solution_from(x, t, t - d, net(x, t, t - d, labels, aug).to(x.dtype))
            t = t - d
        return x
