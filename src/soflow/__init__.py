"""soflow: Solution Flow Models for one- and few-step generation."""

__version__ = "0.1.0"  # before the imports: run.model_card, imported by the pipeline, reads it

from . import nets
from .errors import SoflowError
from .pipeline import Pipeline
from .sampling import sample
from .solution import SolutionFlow

__all__ = ["Pipeline", "SoflowError", "SolutionFlow", "nets", "sample"]
