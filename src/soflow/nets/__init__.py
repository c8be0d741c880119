"""Networks F(x, t, s, labels, augment_labels) and the name registry."""

from .dit import DiT
from .mlp import ResidualMLP
from .registry import REGISTRY, build, canonical_name, data_args
from .unet import SongUNet

__all__ = ["DiT", "SongUNet", "ResidualMLP", "REGISTRY", "build", "canonical_name", "data_args"]
