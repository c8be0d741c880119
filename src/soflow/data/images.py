"""Image datasets: Fashion-MNIST (IDX files), CIFAR-10 (python batches), class-subfolder image folders.

Every dataset yields images in [-1, 1] as float [C, H, W] and integer class labels.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from .sampler import epoch_indices

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".JPEG"}


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1


class ImageData:
    """Images held in memory as uint8 [N, C, H, W], visited in per-epoch shuffles shared by all ranks."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, num_classes: int):
        self.images, self.labels, self.num_classes = images, labels, num_classes
        self.sample_shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, seed: int, position: int, rank: int, world: int,
              n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = epoch_indices(len(self.images), position, rank, world, n, seed)
        return to_float(self.images[idx]), (None if self.labels is None else self.labels[idx])

    def unconditional(self) -> "ImageData":
        return ImageData(self.images, None, 0)


# ---------------------------------------------------------------- Fashion-MNIST

def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """An IDX array (unsigned bytes): big-endian magic, then `ndim` int32 sizes, then the data."""
    try:
        with _open(path) as f:
            head = f.read(4 + 4 * ndim)
            if len(head) < 4 + 4 * ndim:
                raise DataError(f"{path}: truncated IDX header")
            found, *dims = struct.unpack(f">{1 + ndim}i", head)
            if found != magic:
                raise DataError(f"{path}: magic number {found}, expected {magic} (an IDX file with {ndim} dimensions)")
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    if len(data) != int(np.prod(dims)):
        raise DataError(f"{path}: {len(data)} data bytes, expected {int(np.prod(dims))} for shape {tuple(dims)}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder / stem}[.gz]: missing; expected the Fashion-MNIST IDX files in {folder} "
                    f"(apt-get install dataset-fashion-mnist, or set data.path)")


def fashion_mnist(path: str | None = None, split: str = "train") -> ImageData:
    """Fashion-MNIST's `split` (train or test) from the IDX files in `path` (default: the Debian folder)."""
    folder = Path(path or FASHION_MNIST_DIR)
    prefix = "train" if split == "train" else "t10k"
    images_file, labels_file = _find(folder, f"{prefix}-images-idx3-ubyte"), _find(folder, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_file, 2051, 3)
    labels = read_idx(labels_file, 2049, 1)
    if len(images) != len(labels):
        raise DataError(f"{labels_file}: {len(labels)} labels for {len(images)} images in {images_file}")
    if labels.max(initial=0) >= 10:
        raise DataError(f"{labels_file}: label {labels.max()} out of range; Fashion-MNIST has classes 0-9")
    return ImageData(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)), 10)


# ---------------------------------------------------------------- CIFAR-10

class _Refused(pickle.UnpicklingError):
    """A pickle naming something the CIFAR reader does not resolve; the message is its name."""


def _latin1(text, encoding):
    """``_codecs.encode`` as pickles of bytes use it (text -> latin-1 bytes), and nothing else."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode (other than text to latin-1)")
    return text.encode("latin-1")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch dicts. The format is a pickle, which may name any function to
    call; only what numpy arrays, numpy scalars and bytes need is resolved, so no other code can
    run. What comes out is checked by :func:`_plain` (numeric arrays, plain containers)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1
        if (module, name) not in self.ALLOWED:
            raise _Refused(" ".join(f"{module}.{name}".split())[:120])  # one line, whatever the file says
        return super().find_class(module, name)


_PLAIN = (bytes, str, int, float, bool, type(None))


def _plain(obj, depth: int = 0) -> bool:
    """True when `obj` is made of dicts, lists, tuples, bytes, str, numbers and numeric numpy
    arrays or scalars only (no object arrays)."""
    if depth > 8:
        return False
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.dtype.kind in "biufcSU" and not obj.dtype.hasobject
    if isinstance(obj, _PLAIN):
        return True
    if isinstance(obj, dict):
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v, depth + 1) for v in obj)
    return False


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            blob = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: missing; data.path must hold the CIFAR-10 python batches "
                        "(data_batch_1 ... data_batch_5)") from None
    except _Refused as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch: it names {e}, which soflow will not "
                        "unpickle (it reads numeric arrays and plain values only)") from None
    except Exception as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__})") from None
    if not _plain(blob):
        raise DataError(f"{path}: not a CIFAR-10 python batch: it holds objects other than numeric arrays "
                        "and plain values")
    get = lambda k: blob.get(k.encode(), blob.get(k)) if isinstance(blob, dict) else None
    data, labels = get("data"), get("labels")
    if data is None or labels is None:
        raise DataError(f"{path}: expected a dict with 'data' and 'labels'")
    data, labels = np.asarray(data), np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8 or len(labels) != len(data):
        raise DataError(f"{path}: 'data' has shape {data.shape} ({data.dtype}); expected [N, 3072] uint8 with N labels")
    if labels.dtype.kind not in "iu" or labels.min(initial=0) < 0 or labels.max(initial=0) >= 10:
        raise DataError(f"{path}: labels are not integers in 0-9 (CIFAR-10 has classes 0-9)")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def cifar10(path: str | None, split: str = "train") -> ImageData:
    """CIFAR-10's `split` (train or test) from the folder of its python batches."""
    if not path:
        raise DataError("data.name=cifar10 needs data.path: the folder of the CIFAR-10 python batches")
    folder = Path(path)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [_cifar_batch(folder / n) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels), 10)


# ---------------------------------------------------------------- image folders

def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop: halve with box filtering while the short side is >= 2 size, resize the
    short side to `size` (bicubic), then crop the centre square."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


class ImageFolder(torch.utils.data.Dataset):
    """ROOT/<class>/<image>: classes are the sorted subfolder names; images are centre-cropped to
    `resolution` (ADM) and read lazily, one item at a time (DataLoader workers)."""

    def __init__(self, root: str | None, resolution: int):
        if not root:
            raise DataError("data.name=imagefolder needs data.path: a folder with one subfolder per class")
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: no such folder; expected one subfolder of images per class")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.files, labels = [], []
        for k, name in enumerate(classes):
            found = sorted(p for p in (root / name).rglob("*") if p.suffix in IMAGE_SUFFIXES)
            self.files += found
            labels += [k] * len(found)
        if not self.files:
            raise DataError(f"{root}: no images found; expected ROOT/<class>/<image>.png|jpg")
        self.classes, self.labels = classes, torch.tensor(labels)
        self.num_classes, self.resolution = len(classes), resolution
        self.sample_shape = (3, resolution, resolution)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> torch.Tensor:
        """uint8 [3, R, R]."""
        try:
            with Image.open(self.files[i]) as img:
                arr = center_crop_arr(img.convert("RGB"), self.resolution)
        except OSError as e:
            raise DataError(f"{self.files[i]}: unreadable image ({e})") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def __getitem__(self, i: int):
        return to_float(self.load(i)), self.labels[i]
