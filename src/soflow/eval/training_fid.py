"""`metric_name` under its former module, for the importers not yet moved (tests/test_guidance.py).
FID while training is soflow.train.training_fid; the metric names of FID scores are in
soflow.eval.fid.  This module can go once nothing imports it."""

from .fid import metric_name

__all__ = ["metric_name"]
