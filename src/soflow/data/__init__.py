"""Datasets by name.  `make_dataset(cfg.data)` returns an object with `sample_shape`, `num_classes`
and either `batch(seed, position, rank, world, n) -> (x0, labels)` (in memory) or
`__getitem__` (read by DataLoader workers)."""

from __future__ import annotations

from ..errors import DataError
from ..protocols import Dataset
from .toy import TOYS, PointData, ToyData

IMAGE_DATASETS = ("fmnist", "cifar10", "imagefolder", "imagenet-latents")
DATASETS = (*TOYS, "points", *IMAGE_DATASETS)


def make_dataset(data_cfg) -> Dataset:
    """The dataset named by `data_cfg.name`, read from `data_cfg.path` (DataError if unusable)."""
    name = data_cfg.name
    if name in TOYS:
        return ToyData(name)
    if name == "points":
        return PointData(data_cfg.path)
    if name in ("fmnist", "cifar10"):
        from .images import cifar10, fashion_mnist

        data = fashion_mnist(data_cfg.path) if name == "fmnist" else cifar10(data_cfg.path)
        return data if data_cfg.conditional else data.unconditional()
    if name == "imagefolder":
        from .images import ImageFolder

        return ImageFolder(data_cfg.path, data_cfg.resolution)
    if name == "imagenet-latents":
        from .latents import LatentData

        return LatentData(data_cfg.path)
    raise DataError(f"data.name: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


__all__ = ["DATASETS", "DataError", "make_dataset"]
