"""Value checks of a run config: every key, before any work starts (one line naming the key)."""

from __future__ import annotations

import dataclasses
import math
import re

from ..data import DATASETS, IMAGE_DATASETS, has_labels
from ..distributed import DEVICES
from ..errors import ConfigError
from ..guidance import cfg_problem
from ..methods import METHODS
from ..nets import REGISTRY, canonical_name
from ..paths import PARAMETERIZATIONS, PATHS
from .build import AUTOCAST, OPTIMIZERS, guidance_scales, guided_training
from .schema import Config, type_ok

# the accepted values of the keys with a fixed set, named by the registries they index
CHOICES = {
    "method": tuple(METHODS),
    "model.path": tuple(PATHS),
    "model.parameterization": tuple(PARAMETERIZATIONS),
    "train.optimizer": tuple(OPTIMIZERS),
    "train.precision": tuple(AUTOCAST),
    "train.device": DEVICES,
}


def validate(cfg: Config, guidance: bool = True) -> Config:
    """Check every key; `guidance=False` skips the training-time guidance checks (for opening runs
    that were already trained)."""
    if cfg.method not in METHODS:  # first: every check below looks up the method's section
        raise ConfigError(f"method: {cfg.method!r} is not one of {', '.join(METHODS)} (lower case)")
    flat = {"model.path": cfg.model.path, "model.parameterization": cfg.model.parameterization,
            "train.optimizer": cfg.train.optimizer, "train.precision": cfg.train.precision,
            "train.device": cfg.train.device}
    for key, value in flat.items():
        if str(value).lower() not in CHOICES[key]:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(CHOICES[key])}")
    try:
        canonical_name(cfg.model.net)
    except ConfigError as e:
        raise ConfigError(f"model.net: {e}") from None
    _validate_finite(cfg)
    _validate_method_sections(cfg, guidance)
    t = cfg.train
    positive = {"train.total_steps": t.total_steps, "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
                "train.checkpoint_every": t.checkpoint_every, "train.log_every": t.log_every,
                "train.ema_every": t.ema_every, "train.keep_last": t.keep_last, "train.lr": t.lr,
                "train.sample_num": t.sample_num, "data.resolution": cfg.data.resolution}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    non_negative = {"train.weight_decay": t.weight_decay, "train.keep_every": t.keep_every,
                    "train.sample_every": t.sample_every, "data.num_workers": cfg.data.num_workers}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {value}")
    ranges = {"data.augment_p": cfg.data.augment_p, "train.ema_decay": t.ema_decay}
    for key, value in ranges.items():
        if not 0 <= value <= 1:
            raise ConfigError(f"{key}: must lie in [0, 1], got {value}")
    if len(t.betas) != 2 or not all(type_ok(x, float) for x in t.betas):
        raise ConfigError(f"train.betas: expected two numbers, got {t.betas!r}")
    if not all(0 <= x < 1 for x in t.betas):
        raise ConfigError(f"train.betas: Adam's decay rates must lie in [0, 1), got {t.betas!r}")
    if t.sample_mode is not None and t.sample_mode not in METHODS[cfg.method].modes:
        raise ConfigError(f"train.sample_mode: method {cfg.method} samples with "
                          f"{' | '.join(METHODS[cfg.method].modes)}, not {t.sample_mode!r}")
    if not t.sample_nfe or not all(type_ok(x, int) and x >= 1 for x in t.sample_nfe):
        raise ConfigError(f"train.sample_nfe: expected a list of positive integers, got {t.sample_nfe!r}")
    if t.init_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", t.init_sha256):
        raise ConfigError(f"train.init_sha256: expected 64 lowercase hex digits, got {t.init_sha256!r}")
    if cfg.method == "meanflow" and str(t.precision).lower() == "fp16":
        raise ConfigError("train.precision: fp16 overflows MeanFlow's forward-mode derivative (NaN tangents through "
                          "the U-Net); use bf16 or fp32")
    if t.grad_clip is not None and t.grad_clip <= 0:
        raise ConfigError(f"train.grad_clip: must be a positive norm, or null for no clipping, got {t.grad_clip}")
    if t.threads < 0:
        raise ConfigError(f"train.threads: must be 0 (choose by network size) or a positive count, got {t.threads}")
    _validate_fid(cfg)
    if cfg.data.name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset {cfg.data.name!r}; choose one of {', '.join(DATASETS)}")
    return cfg


def _validate_method_sections(cfg: Config, guidance: bool) -> None:
    """Every method's section through its loss's own checks (one line naming `section.field`), then
    what the chosen method needs of the rest of the config.  `guidance=False` skips the method's
    label checks (for opening runs that were already trained)."""
    for m in METHODS.values():
        section = getattr(cfg, m.section)
        try:
            type(section)(**{f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.init})
        except ValueError as e:
            raise ConfigError(f"{m.section}.{e}") from None
    m = METHODS[cfg.method]
    if m.linear_euler_only and (cfg.model.path, cfg.model.parameterization) != ("linear", "euler"):
        raise ConfigError(f"method={m.name} needs model.path=linear and model.parameterization=euler")
    w_range = getattr(getattr(cfg, m.section), "guidance_range", None)
    if w_range is not None and not getattr(REGISTRY[canonical_name(cfg.model.net)].func, "takes_guidance", False):
        raise ConfigError(f"{m.section}.guidance_range: network {cfg.model.net} cannot take the guidance scale as "
                          "an input; use a DiT (dit-*) or mlp, or set it to null")
    if not m.through_ddp and cfg.train.fsdp:
        raise ConfigError(f"train.fsdp: not supported with method={m.name} (its loss runs on the unwrapped network)")
    if guidance and m.check is not None:
        try:
            m.check(getattr(cfg, m.section), has_labels(cfg.data), cfg.data.name, f"{m.section}.")
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _first_non_finite(value, key: str):
    """(dotted key, value) of the first nan or infinite number in `value`, searching nested mappings
    and lists (net_args included), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (key, value)
    if isinstance(value, dict):
        items = ((f"{key}.{k}" if key else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{key}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub_key, sub in items:
        found = _first_non_finite(sub, sub_key)
        if found:
            return found
    return None


def _validate_finite(cfg: Config) -> None:
    """No setting means anything as nan or infinity, and nan would slip through every range check below."""
    found = _first_non_finite(cfg.to_dict(), "")
    if found:
        raise ConfigError(f"{found[0]}: must be a finite number, got {found[1]}")


def _validate_fid_guidance(cfg: Config) -> None:
    """train.fid_guidance: distinct finite scales, each one the model of this config can honour."""
    scales = cfg.train.fid_guidance
    if not isinstance(scales, list) or not all(type_ok(w, float) for w in scales):
        raise ConfigError(f"train.fid_guidance: expected a list of guidance scales, got {scales!r}")
    if len(set(scales)) != len(scales):
        raise ConfigError(f"train.fid_guidance: {scales!r} repeats an entry")
    honoured = guidance_scales(cfg)
    for w in scales:
        problem = honoured.problem(w)
        if problem is None and honoured.kind == "sampling" and w != 1:
            problem = cfg_problem(has_labels(cfg.data), guided_training(cfg))
        if problem:
            raise ConfigError(f"train.fid_guidance: scale {w:g}: {problem}")


def _validate_fid(cfg: Config) -> None:
    """The FID settings that can be checked without touching files (those are checked when training starts)."""
    t = cfg.train
    if t.fid_every < 0:
        raise ConfigError(f"train.fid_every: must be 0 (off) or a positive number of steps, got {t.fid_every}")
    if t.fid_num < 2:
        raise ConfigError(f"train.fid_num: a covariance needs at least 2 samples, got {t.fid_num}")
    if t.fid_batch_size < 1:
        raise ConfigError(f"train.fid_batch_size: must be positive, got {t.fid_batch_size}")
    if not t.fid_nfe or not all(type_ok(x, int) and x >= 1 for x in t.fid_nfe):
        raise ConfigError(f"train.fid_nfe: expected a list of positive integers, got {t.fid_nfe!r}")
    if len(set(t.fid_nfe)) != len(t.fid_nfe):
        raise ConfigError(f"train.fid_nfe: {t.fid_nfe!r} repeats an entry")
    _validate_fid_guidance(cfg)
    if t.fid_dims not in (64, 192, 768, 2048):
        raise ConfigError(f"train.fid_dims: {t.fid_dims} is not an Inception feature size; choose 2048 (standard FID), "
                          "768, 192 or 64")
    if t.fid_every and not t.fid_ref:
        raise ConfigError("train.fid_ref: train.fid_every > 0 needs reference statistics: "
                          "--set train.fid_ref=REF.npz (from `soflow fid ref`, or ADM's reference batch)")
    if t.fid_every and cfg.data.name in DATASETS and cfg.data.name not in IMAGE_DATASETS:
        raise ConfigError(f"train.fid_every: FID needs image data; data.name={cfg.data.name} is not one of "
                          f"{', '.join(IMAGE_DATASETS)}")


