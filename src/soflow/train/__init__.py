"""Training system: config and presets, the loop (`loop.train`), checkpoints, the run lock,
EMA, distributed set-up, and opening trained runs (`load.load_run`)."""

from .ema import EMA

__all__ = ["EMA"]
