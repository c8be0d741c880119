"""Conditional flow matching as a baseline on the soflow networks.

The model velocity is the s = t derivative of the solution function, v(x, t) = velocity_from(x_t, t,
F(x_t, t, t)) (paths.py, eq. 3), regressed on the conditional path velocity
alpha'(t) x0 + beta'(t) x1.  Sample with an ODE solver: `soflow.sampling.ode_sample`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..paths import conditional_velocity, interpolate, mean_per_row
from ..solution import SolutionFlow
from ..times import logit_normal
from . import checks
from .scales import drop_labels


@dataclass
class FlowMatchingLoss:
    """Callable loss: `loss, stats = FlowMatchingLoss(...)(flow, x0, labels, step)`.

    time_mean, time_std: logit-normal (mean, std) of t
    cfg_drop_rate:       share of labels replaced by the null class (for sampling-time guidance)
    p, eps:              adaptive weight 1 / (mse + eps)^p per row; p = 0 (default) is plain MSE

    The loss is mean_i sg(w_i) mse_i with mse_i the squared error averaged over the dimensions.
    One network forward (with grad) per step.
    """

    time_mean: float = 0.0
    time_std: float = 1.0
    cfg_drop_rate: float = 0.0
    p: float = 0.0
    eps: float = 0.01

    def __post_init__(self):
        checks.number("time_mean", self.time_mean)
        checks.positive("time_std", self.time_std)
        checks.in_unit_interval("cfg_drop_rate", self.cfg_drop_rate)
        checks.non_negative("p", self.p)
        checks.positive("eps", self.eps)

    def __call__(self, flow: SolutionFlow, x0: Tensor, labels: Tensor | None = None, step: int = 0,
                 augment_labels: Tensor | None = None, net: nn.Module | None = None) -> tuple[Tensor, dict]:
        b, dev = x0.shape[0], x0.device
        x1 = torch.randn_like(x0)
        labels, _ = drop_labels(labels, self.cfg_drop_rate, flow.num_classes, dev)
        t = logit_normal(b, self.time_mean, self.time_std, device=dev).to(x0.dtype)
        return self.loss_on(flow, x0, x1, t, labels, augment_labels, net)

    def loss_on(self, flow: SolutionFlow, x0: Tensor, x1: Tensor, t: Tensor, labels: Tensor | None = None,
                augment_labels: Tensor | None = None, net: nn.Module | None = None) -> tuple[Tensor, dict]:
        """The loss for given data x0, noise x1, times t [B] and (already dropped) labels."""
        net = flow.net if net is None else net
        x_t = interpolate(flow.path, x0, x1, t)
        v_pred = flow.velocity_from(x_t, t, net(x_t, t, t, labels, augment_labels).to(x0.dtype))
        target = conditional_velocity(flow.path, x0, x1, t)
        mse = mean_per_row((v_pred - target) ** 2)
        weight = (mse.detach() + self.eps) ** -self.p
        stats = {"velocity_mse": mse.detach().mean(), "velocity_weight": weight.mean()}
        return (weight * mse).mean(), stats
