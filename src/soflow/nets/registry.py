"""Network names -> constructors.  `build("dit-b2", num_classes=10)` overrides any argument.

Each network class also says which of its arguments the data fix (`data_args(sample_shape,
num_classes, null_class, augment_dim)`), so a new network touches only this package.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from ..errors import CheckpointError, ConfigError
from .dit import DiT
from .mlp import ResidualMLP
from .unet import SongUNet

# DiT sizes of the paper (32x32x4 SD-VAE latents, 1000 classes + null) and small CPU sizes.
_DIT = {
    "dit-b4": dict(patch_size=4, hidden_size=768, depth=12, num_heads=12),
    "dit-b2": dict(patch_size=2, hidden_size=768, depth=12, num_heads=12),
    "dit-m2": dict(patch_size=2, hidden_size=1024, depth=16, num_heads=16),
    "dit-l2": dict(patch_size=2, hidden_size=1024, depth=24, num_heads=16),
    "dit-xl2": dict(patch_size=2, hidden_size=1152, depth=28, num_heads=16),
    "dit-s2": dict(patch_size=2, hidden_size=384, depth=12, num_heads=6),
    "dit-tiny": dict(patch_size=2, hidden_size=128, depth=4, num_heads=4, input_size=16),
}

REGISTRY = {name: partial(DiT, **kw) for name, kw in _DIT.items()}
# The reference CIFAR-10 U-Net (DDPM++ widths, dropout 0.3, 6 augment labels).
REGISTRY["unet-cifar10"] = partial(SongUNet)
REGISTRY["unet-small"] = partial(SongUNet, model_channels=32, channel_mult=(1, 2), num_blocks=1,
                                 attn_resolutions=(8,), dropout=0.0, augment_dim=0, img_resolution=16)
REGISTRY["mlp"] = partial(ResidualMLP)

# The reference configs' `model_type` names.
ALIASES = {"DiT-B-4": "dit-b4", "DiT-B-2": "dit-b2", "DiT-M-2": "dit-m2", "DiT-L-2": "dit-l2",
           "DiT-XL-2": "dit-xl2", "UNet": "unet-cifar10"}


def canonical_name(name: str) -> str:
    """The registry key of a network name or reference alias (ConfigError if unknown)."""
    key = ALIASES.get(name, str(name).lower())
    if key not in REGISTRY:
        raise ConfigError(f"unknown network {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return key


def data_args(name: str, sample_shape: tuple, num_classes: int, null_class: bool, augment_dim: int) -> dict:
    """The constructor arguments of network `name` that follow from the data."""
    return REGISTRY[canonical_name(name)].func.data_args(tuple(sample_shape), num_classes, null_class, augment_dim)


def build(name: str, **overrides) -> nn.Module:
    """Construct a registered network; keyword overrides replace its defaults."""
    ctor = REGISTRY[canonical_name(name)]
    try:
        return ctor(**overrides)
    except TypeError as e:
        raise ConfigError(f"network {name!r}: {e}") from None


def load_into(net: nn.Module, state: dict, source: str = "state dict") -> nn.Module:
    """Copy `state` into `net`, requiring the same names and shapes."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    problems = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
               ([f"unexpected {', '.join(unexpected[:3])}"] if unexpected else []) + \
               ([f"shape {', '.join(wrong[:3])}"] if wrong else [])
    if problems:
        raise CheckpointError(f"{source} does not fit {type(net).__name__}: {'; '.join(problems)}")
    net.load_state_dict(state, strict=True, assign=any(p.is_meta for p in net.parameters()))
    return net
