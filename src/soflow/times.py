"""Time samplers, the middle-time schedule r(k, K) and the guidance decay g(t).

All samplers draw on the device of the returned tensor and never synchronize with the host.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import ConfigError

MIN_GAP = 1e-4  # smallest t - s and t - l the consistency sampler allows
GUIDANCE_DECAY_RATE = 0.025  # k in g(t), fixed by the reference recipe
SCHEDULES = ("const", "linear", "cosine", "exponent")


def logit_normal(n: int, mean: float, std: float, *, device: torch.device | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """sigmoid(N(mean, std^2)) samples in (0, 1)."""
    z = torch.randn(n, device=device, generator=generator)
    return torch.sigmoid(z * std + mean)


def consistency_times(n: int, s_mean: float, s_std: float, t_mean: float, t_std: float,
                      ratio: float, *, device: torch.device | None = None,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Draw s < l < t for the solution-consistency loss.

    t = max(sigmoid(N(t_mean, t_std)), 1e-4) and s = min(sigmoid(N(s_mean, s_std)), t - 1e-4):
    an s drawn above t is clipped, not redrawn.  The middle time is
    l = min(t + (s - t) r, t - 1e-4) with r = r(k, K) from `middle_ratio`; since r <= 1, l >= s.
    """
    s = logit_normal(n, s_mean, s_std, device=device, generator=generator)
    t = logit_normal(n, t_mean, t_std, device=device, generator=generator)
    t = t.clamp(min=MIN_GAP)
    s = torch.minimum(s, t - MIN_GAP)
    l = torch.minimum(middle_time(t, s, ratio), t - MIN_GAP)
    return t, s, l


def middle_ratio(schedule: str, step: int, total_steps: int, r_init: float, r_end: float) -> float:
    """r(k, K): how far from t towards s the consistency target sits, at step k of K.

    Const: r_end.  Linear: r_init + (r_end - r_init) k / K.
    Cosine: r_end + (r_init - r_end) (1 + cos(pi k / K)) / 2.  Exponent: r_init (r_end / r_init)^(k / K).
    """
    name = str(schedule).lower()
    frac = step / total_steps
    if name == "const":
        return r_end
    if name == "linear":
        return r_init + (r_end - r_init) * frac
    if name == "cosine":
        return r_end + (r_init - r_end) * 0.5 * (1 + math.cos(math.pi * frac))
    if name == "exponent":
        return r_init * (r_end / r_init) ** frac
    raise ConfigError(f"unknown middle-time schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def middle_time(t: Tensor, s: Tensor, ratio: float) -> Tensor:
    """l = t + (s - t) r."""
    return t + (s - t) * ratio


def guidance_decay(t: Tensor, decay_time: float) -> Tensor:
    """g(t): 1 up to decay_time, then a smooth fall to 0 at t = 1.

    With d = clamp((1 - t) / (1 - tau), 0, 1 - 1e-6), g(t) = 1 - exp(-k d / (1 - d)) for t > tau,
    k = 0.025.  decay_time >= 1 disables the decay (g = 1).
    """
    if decay_time >= 1:
        return torch.ones_like(t)
    d = ((1 - t) / (1 - decay_time)).clamp(0, 1 - 1e-6)
    decayed = 1 - torch.exp(-GUIDANCE_DECAY_RATE * d / (1 - d))
    return torch.where(t <= decay_time, torch.ones_like(t), decayed)
