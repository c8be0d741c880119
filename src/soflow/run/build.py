"""From a Config to the objects of a run: network, SolutionFlow, objective, optimizer."""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ConfigError
from ..nets import build, canonical_name
from ..objectives import SoFlowLoss, make_objective
from ..solution import SolutionFlow
from .config import Config


def network_args(cfg: Config, sample_shape: tuple, num_classes: int) -> dict:
    """The network's constructor arguments: data-dependent sizes first, then model.net_args."""
    name = canonical_name(cfg.model.net)
    guided = guided_training(cfg)
    if name == "mlp":
        args = dict(dim=sample_shape[0], num_classes=num_classes, null_class=guided)
    elif name.startswith("dit"):
        args = dict(in_channels=sample_shape[0], input_size=sample_shape[-1], num_classes=num_classes, null_class=guided)
    else:
        from ..data.augment import AUGMENT_DIM

        args = dict(in_channels=sample_shape[0], out_channels=sample_shape[0], img_resolution=sample_shape[-1],
                    label_dim=num_classes, augment_dim=AUGMENT_DIM if cfg.data.augment_p > 0 else 0)
    return {**args, **cfg.model.net_args}


def build_flow(cfg: Config, sample_shape: tuple, num_classes: int) -> SolutionFlow:
    try:
        net = build(cfg.model.net, **network_args(cfg, sample_shape, num_classes))
    except ValueError as e:
        raise ConfigError(f"model.net_args: {e}") from None
    if tuple(net.sample_shape) != tuple(sample_shape):
        raise ConfigError(f"model.net_args: the network takes {tuple(net.sample_shape)} samples but the data "
                          f"has {tuple(sample_shape)}")
    return SolutionFlow(net, cfg.model.path, cfg.model.parameterization)


def build_objective(cfg: Config):
    """The loss of `cfg.method` with its config section."""
    if cfg.method == "soflow":
        o = dataclasses.asdict(cfg.objective)
        return SoFlowLoss(**{**o, "time_mean": tuple(o["time_mean"]), "time_std": tuple(o["time_std"])},
                          total_steps=cfg.train.total_steps)
    return make_objective(cfg.method, **dataclasses.asdict(getattr(cfg, cfg.method)))


def guided_training(cfg: Config) -> bool:
    """Whether labels are dropped to the null class in training (so the network needs that row)."""
    section = cfg.objective if cfg.method == "soflow" else getattr(cfg, cfg.method)
    return section.cfg_drop_rate > 0


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    t = cfg.train
    kind = {"adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[t.optimizer.lower()]
    return kind(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
