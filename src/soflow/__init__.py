"""soflow: Solution Flow Models for one- and few-step generation."""

from . import nets
from .errors import SoflowError
from .pipeline import Pipeline
from .sampling import sample
from .solution import SolutionFlow
from .version import __version__

__all__ = ["Pipeline", "SoflowError", "SolutionFlow", "__version__", "nets", "sample"]
