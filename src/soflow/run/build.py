"""From a Config to the objects of a run: network, SolutionFlow, objective, optimizer."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..data.augment import AUGMENT_DIM
from ..errors import ConfigError
from ..guidance import GuidanceScales, scales_of
from ..methods import method
from ..nets import build, data_args
from ..protocols import Objective
from ..solution import SolutionFlow
from .schema import Config

# train.optimizer: the optimizer class of each name
OPTIMIZERS = {"adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}
# train.precision: the autocast dtype of each name (None: no autocast)
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def network_args(cfg: Config, sample_shape: tuple, num_classes: int) -> dict:
    """The network's constructor arguments: those the data fix (the network's own `data_args`), then
    model.net_args over them."""
    augment_dim = AUGMENT_DIM if cfg.data.augment_p > 0 else 0
    extra = {"guidance_input": True} if guidance_input(cfg) else {}
    return {**data_args(cfg.model.net, sample_shape, num_classes, guided_training(cfg), augment_dim),
            **extra, **cfg.model.net_args}


def build_flow(cfg: Config, sample_shape: tuple, num_classes: int) -> SolutionFlow:
    """A new SolutionFlow of `cfg` for data of `sample_shape` and `num_classes` (0: unconditional)."""
    try:
        net = build(cfg.model.net, **network_args(cfg, sample_shape, num_classes))
    except ValueError as e:
        raise ConfigError(f"model.net_args: {e}") from None
    if tuple(net.sample_shape) != tuple(sample_shape):
        raise ConfigError(f"model.net_args: the network takes {tuple(net.sample_shape)} samples but the data "
                          f"has {tuple(sample_shape)}")
    return solution_flow(cfg, net)


def solution_flow(cfg: Config, net: nn.Module) -> SolutionFlow:
    """`net` as a SolutionFlow with the noising path and parameterization of `cfg.model`: the one place
    a config makes a SolutionFlow (of a new network in `build_flow`, of the EMA copy in training)."""
    return SolutionFlow(net, cfg.model.path, cfg.model.parameterization)


def build_objective(cfg: Config) -> Objective:
    """The loss of `cfg.method`: its config section (validated, K = train.total_steps filled in)."""
    return getattr(cfg, method(cfg.method).section)


def guided_training(cfg: Config) -> bool:
    """Whether labels are dropped to the null class in training (so the network needs that row)."""
    return build_objective(cfg).cfg_drop_rate > 0


def guidance_input(cfg: Config) -> bool:
    """Whether the network takes the guidance scale as an input (the method's guidance_range is set)."""
    return getattr(build_objective(cfg), "guidance_range", None) is not None


def guidance_scales(cfg: Config) -> GuidanceScales:
    """The guidance scales a model of this config honours at sampling time (soflow.guidance)."""
    return scales_of(build_objective(cfg), method(cfg.method).section)


def build_optimizer(cfg: Config, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer of `cfg.train` (AdamW or RAdam) over `params`."""
    t = cfg.train
    kind = OPTIMIZERS[t.optimizer.lower()]
    return kind(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
