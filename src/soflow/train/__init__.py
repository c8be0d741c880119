"""Training system: EMA and (later) the loop, config, checkpoints."""

from .ema import EMA

__all__ = ["EMA"]
