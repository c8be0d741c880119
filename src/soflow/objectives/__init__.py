"""Training objectives: callables returning (loss, stats).  Which method uses which, and how its
models are sampled: soflow.methods."""

from .flow_matching import FlowMatchingLoss
from .meanflow import MeanFlowLoss
from .shortcut import ShortcutLoss
from .soflow import Rows, SoFlowLoss

__all__ = ["Rows", "SoFlowLoss", "MeanFlowLoss", "FlowMatchingLoss", "ShortcutLoss"]
