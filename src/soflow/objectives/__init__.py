"""Training objectives: callables returning (loss, stats)."""

from .soflow import Rows, SoFlowLoss

__all__ = ["Rows", "SoFlowLoss"]
