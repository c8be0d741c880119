"""Training: the loop (`loop.train`), the run lock, EMA, DDP/FSDP wrapping and running statistics."""

from .ema import EMA

__all__ = ["EMA"]
