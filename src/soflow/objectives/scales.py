"""Classifier-free guidance in training, shared by the losses: label dropout (`drop_labels`, all
four losses), and guidance scales as a network input (`guidance_range`, SoFlow and MeanFlow):
each training row's own scale w, the network call that passes it, and the settings' checks.

A loss with `guidance_range: [w_lo, w_hi]` draws one w per row from `guidance_distribution` on the
range (label-dropped rows train at w = 1), feeds it to the network (GuidanceEmbedder of the DiT and
MLP) and guides that row's target at its own w; sampling then passes any w in the range as an
input, one forward per step (soflow.guidance, kind "input").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..data import traits
from . import checks

if TYPE_CHECKING:
    from .meanflow import MeanFlowLoss
    from .soflow import SoFlowLoss

GUIDANCE_DISTRIBUTIONS = ("uniform", "log-uniform")


def drop_labels(labels: Tensor | None, rate: float, num_classes: int,
                device: torch.device | None = None) -> tuple[Tensor | None, Tensor | None]:
    """Label dropout for classifier-free guidance: (labels, mask) with each label replaced by the
    null class (id num_classes) with probability `rate`, and mask True where it was.  One draw of
    torch.rand(B) on `device`; no draw, and (labels, None), without labels or when rate is 0."""
    if labels is None or not rate > 0:
        return labels, None
    mask = torch.rand(labels.shape[0], device=device) < rate
    return with_null(labels, mask, num_classes), mask


def with_null(labels: Tensor, mask: Tensor, num_classes: int) -> Tensor:
    """`labels` with the null class (id num_classes) on the rows where `mask` is True."""
    return torch.where(mask, torch.full_like(labels, num_classes), labels)


def call_net(net: nn.Module, x: Tensor, t: Tensor, s: Tensor, labels: Tensor | None,
             augment_labels: Tensor | None, w: Tensor | None = None) -> Tensor:
    """F(x, t, s | y, w): the guidance scale goes in only for a network that takes it."""
    if w is None:
        return net(x, t, s, labels, augment_labels)
    return net(x, t, s, labels, augment_labels, guidance=w)


def draw_scales(n: int, low: float, high: float, distribution: str, device: torch.device | None = None) -> Tensor:
    """n guidance scales on [low, high]: w = low + (high - low) u ("uniform") or
    w = low (high / low)^u ("log-uniform", as many draws in [1, 2] as in [2, 4]), u ~ U(0, 1)."""
    u = torch.rand(n, device=device)
    if distribution == "log-uniform":
        return low * (high / low) ** u
    return low + (high - low) * u


def row_scales(w_range: Sequence[float] | None, distribution: str, n: int, cfg_mask: Tensor | None,
               device: torch.device | None) -> Tensor | None:
    """Each row's guidance scale drawn on `w_range` (None, and no draw, when it is None); rows whose
    label was dropped (cfg_mask) get w = 1."""
    if w_range is None:
        return None
    w = draw_scales(n, float(w_range[0]), float(w_range[1]), distribution, device)
    return w if cfg_mask is None else torch.where(cfg_mask, torch.ones_like(w), w)


def check_range(w_range: Sequence[float] | None, distribution: str, default: float, default_key: str, default_text: str,
                one_scale: str) -> None:
    """guidance_distribution known; a guidance_range [w_lo, w_hi] with 1 <= w_lo < w_hi that holds
    `default`, the scale sampled by default (ValueError naming `default_key`, described in the
    message as `default_text`).  `one_scale` says how the loss trains a single scale instead."""
    if distribution not in GUIDANCE_DISTRIBUTIONS:
        raise ValueError(f"guidance_distribution: unknown distribution {distribution!r}; "
                         f"choose one of {', '.join(GUIDANCE_DISTRIBUTIONS)}")
    if w_range is None:
        return
    w_lo, w_hi = checks.numbers("guidance_range", w_range, 2, "w_lo, w_hi")
    if not 1 <= w_lo < w_hi:
        raise ValueError(f"guidance_range: expected 1 <= w_lo < w_hi, got {[w_lo, w_hi]} (one scale: {one_scale} "
                         "and leave guidance_range null)")
    if not w_lo <= default <= w_hi:
        raise ValueError(f"{default_key}: with guidance_range {[w_lo, w_hi]} {default_text} the scale sampled by "
                         f"default and must lie in the range, got {default:g}")


def check_labels(loss: SoFlowLoss | MeanFlowLoss, has_labels: bool, data_name: str, key: str) -> None:
    """guidance_range needs labels and label dropout: the guided target uses the model's null-label
    velocity, which only the label-dropped rows train.  `key` prefixes the setting names."""
    w_range = list(loss.guidance_range)
    if not has_labels:
        fix = " (or data.conditional=true)" if traits(data_name).labels == "optional" else ""
        raise ValueError(f"{key}guidance_range={w_range}: guidance as a network input needs class labels, but "
                         f"data.name={data_name} gives none; set {key}guidance_range=null{fix}")
    if loss.cfg_drop_rate == 0:
        raise ValueError(f"{key}guidance_range={w_range} with {key}cfg_drop_rate=0: the guided target needs the "
                         "unconditional velocity of the null class, which only label dropout trains; set "
                         f"{key}cfg_drop_rate above 0 (the reference uses 0.1)")
