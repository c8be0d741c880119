"""Evaluation: FID / Inception Score for images, energy distance / sliced W2 for point clouds.

torch-fidelity (``pip install 'soflow[fid]'``) is only needed by :class:`InceptionFeatures`; it is
imported when one is built.
"""

from ..errors import EvalError
from .fid import (fid_from_images, frechet_distance, inception_score, load_stats, save_stats, statistics,
                  stats_from_images)
from .images import load_images
from .inception import InceptionFeatures, default_weights_path
from .points import energy_distance, sliced_wasserstein2

__all__ = [
    "EvalError",
    "InceptionFeatures",
    "default_weights_path",
    "energy_distance",
    "fid_from_images",
    "frechet_distance",
    "inception_score",
    "load_images",
    "load_stats",
    "save_stats",
    "sliced_wasserstein2",
    "statistics",
    "stats_from_images",
]
