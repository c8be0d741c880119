"""Datasets by name.  `make_dataset(cfg.data)` returns an object with `sample_shape`, `num_classes`
and `batch(generator, step, rank, world, n) -> (x0, labels)`."""

from __future__ import annotations

from .sampler import DataError
from .toy import TOYS, PointData, ToyData

IMAGE_DATASETS = ("fmnist", "cifar10", "imagefolder", "imagenet-latents")
DATASETS = (*TOYS, "points", *IMAGE_DATASETS)


def make_dataset(data_cfg):
    name = data_cfg.name
    if name in TOYS:
        return ToyData(name)
    if name == "points":
        return PointData(data_cfg.path)
    raise DataError(f"data.name: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


__all__ = ["DATASETS", "DataError", "make_dataset"]
