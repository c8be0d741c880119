"""Datasets by name.  `make_dataset(cfg.data)` returns an object with `sample_shape`, `num_classes`
and either `batch(seed, position, rank, world, n) -> (x0, labels)` (in memory) or
`__getitem__` (read by DataLoader workers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import DataError
from ..protocols import Dataset
from .latents import LatentData
from .toy import TOYS, PointData, ToyData

if TYPE_CHECKING:
    from ..run.schema import DataConfig


@dataclass(frozen=True)
class DatasetTraits:
    """What the rest of soflow asks of a dataset by its name, without reading it."""

    image: bool = False  # samples are images [C, H, W] or latents of images: FID applies
    latent: bool = False  # samples are SD-VAE latents, decoded with data.vae before they are shown or scored
    labels: str = "never"  # class labels in the batches: never | always | optional (kept unless data.conditional=false)

    def has_labels(self, conditional: bool = True) -> bool:
        """Whether batches carry class labels, given data.conditional."""
        return self.labels == "always" or (self.labels == "optional" and conditional)


POINTS = DatasetTraits()  # 2-D toys and point clouds: vectors, no labels
TRAITS = {
    **{name: POINTS for name in TOYS},
    "points": POINTS,
    "fmnist": DatasetTraits(image=True, labels="optional"),
    "cifar10": DatasetTraits(image=True, labels="optional"),
    "imagefolder": DatasetTraits(image=True, labels="always"),
    "imagenet-latents": DatasetTraits(image=True, latent=True, labels="always"),
}
DATASETS = tuple(TRAITS)
IMAGE_DATASETS = tuple(name for name, t in TRAITS.items() if t.image)


def traits(name: str) -> DatasetTraits:
    """The traits of dataset `name`; a name that is not one of DATASETS has none of them (the config
    check refuses it with the list of names)."""
    return TRAITS.get(name, POINTS)


def has_labels(data_cfg: DataConfig) -> bool:
    """Whether training batches of `data_cfg` carry class labels (the toys and `points` never do)."""
    return traits(data_cfg.name).has_labels(data_cfg.conditional)


def make_dataset(data_cfg: DataConfig) -> Dataset:
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
        return LatentData(data_cfg.path)
    raise DataError(f"data.name: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


__all__ = ["DATASETS", "DataError", "DatasetTraits", "IMAGE_DATASETS", "has_labels", "make_dataset", "traits"]
