"""The version of soflow, in a module of its own: the package and run.model_card both read it."""

__version__ = "0.1.0"
