"""Training objectives: callables returning (loss, stats)."""

from ..errors import ConfigError
from .flow_matching import FlowMatchingLoss
from .meanflow import MeanFlowLoss
from .soflow import Rows, SoFlowLoss

OBJECTIVES = {"soflow": SoFlowLoss, "meanflow": MeanFlowLoss, "flow_matching": FlowMatchingLoss}


def make_objective(method: str, **kwargs):
    """The loss of a training method ("soflow" | "meanflow" | "flow_matching") built with kwargs."""
    if method not in OBJECTIVES:
        raise ConfigError(f"unknown training method {method!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[method](**kwargs)


__all__ = ["Rows", "SoFlowLoss", "MeanFlowLoss", "FlowMatchingLoss", "OBJECTIVES", "make_objective"]
