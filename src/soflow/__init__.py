"""soflow: Solution Flow Models for one- and few-step generation."""

from . import nets
from .solution import SolutionFlow

__all__ = ["SolutionFlow", "nets", "sample"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "sample":
        from .sampling import sample
        return sample
    raise AttributeError(name)
