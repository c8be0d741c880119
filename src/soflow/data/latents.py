"""SD-VAE latents: training on the stored posteriors.

`soflow.data.vae.encode_latents` writes, for each shard of the sorted image list, the VAE posterior mean and
std and the labels (`shard-XXXXX/{mean,std,labels}.npy`), skipping shards already written, with
the shards spread over torchrun ranks.  Training draws a fresh posterior sample each step,
z = (mean + std * eps) * 0.18215; sampling decodes z / 0.18215 with the same VAE.
The reference implementation's `imagenet_latent.hdf5` (datasets `latents` = [mean, std] along
channels, `labels`, `amount`, `latent_size`) is read as is; `data.path` may also name the folder
holding it.  Both stores are read batch by batch, so memory does not grow with the dataset, and
a batch's rows keep the random order of the data stream although both stores are sorted by class.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..seeding import generator
from .sampler import epoch_indices

from .vae import SCALE

HDF5_NAME = "imagenet_latent.hdf5"


class FileRows:
    """Rows of a C-ordered array stored raw at byte `offset` of `file`, read with positional reads.

    Nothing is memory-mapped: a mapping's touched pages count as the process's memory and would
    grow towards the dataset's size over an epoch, while read() leaves them in the page cache only.
    The file is opened per read, so no descriptor is held (a store may have thousands of shards)
    and forked processes share nothing.
    """

    def __init__(self, file: Path, offset: int, dtype: np.dtype, shape: tuple):
        self.file, self.offset, self.dtype, self.shape = file, int(offset), np.dtype(dtype), tuple(shape)
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))

    def __len__(self) -> int:
        return self.shape[0]

    def read_into(self, out: np.ndarray, rows: np.ndarray, items: np.ndarray) -> None:
        """out[rows[k]] = item items[k]; items ascending, so the reads move forward through the file."""
        fd = os.open(self.file, os.O_RDONLY)
        try:
            for row, item in zip(rows.tolist(), items.tolist()):
                got = os.preadv(fd, [out[row]], self.offset + item * self.row_bytes)
                if got != self.row_bytes:
                    raise DataError(f"{self.file}: ends inside item {item}; the file is truncated")
        finally:
            os.close(fd)


def npy_rows(file: Path) -> FileRows:
    """The layout of an .npy file (offset of the data, dtype, shape), from its header only."""
    try:
        with open(file, "rb") as f:
            fmt = np.lib.format
            version = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except (OSError, ValueError) as e:
        raise DataError(f"{file}: not a readable .npy array ({type(e).__name__}); "
                        "rerun `soflow encode-latents` for this shard") from None
    if fortran or not np.issubdtype(dtype, np.number):
        raise DataError(f"{file}: a {'Fortran-ordered ' if fortran else ''}{dtype} array; expected C-ordered numbers")
    rows = FileRows(file, offset, dtype, shape)
    if file.stat().st_size < offset + rows.row_bytes * (shape[0] if shape else 0):
        raise DataError(f"{file}: shorter than its header says; rerun `soflow encode-latents` for this shard")
    return rows


def gather(parts: list[FileRows], offsets: np.ndarray, idx: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[k] = item idx[k] of the concatenation of `parts` (part p starts at offsets[p]).

    Reads go part by part in increasing item order; rows land at their place in idx, which keeps
    the caller's (random) order.  Repeated items are read twice.
    """
    order = np.argsort(idx, kind="stable")
    ordered = idx[order]
    part = np.searchsorted(offsets, ordered, side="right") - 1
    starts = np.flatnonzero(np.r_[True, part[1:] != part[:-1]])
    for lo, hi in zip(starts, np.r_[starts[1:], len(idx)]):
        p = part[lo]
        parts[p].read_into(out, order[lo:hi], ordered[lo:hi] - offsets[p])
    return out


class ShardRows:
    """The encode-latents folder: shard-XXXXX/{mean,std,labels}.npy.  Labels are kept in RAM (8
    bytes an item); means and stds are read per batch."""

    def __init__(self, folder: Path):
        meta_file = folder / "meta.json"
        try:
            meta = json.loads(meta_file.read_text())
            num_shards, classes = int(meta["num_shards"]), list(meta["classes"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{meta_file}: unreadable ({type(e).__name__}); expected the meta.json written by "
                            "`soflow encode-latents`") from None
        shards = [folder / f"shard-{i:05d}" for i in range(num_shards)]
        missing = [s.name for s in shards if not (s / "labels.npy").is_file()]
        if missing:
            raise DataError(f"{folder}: {len(missing)} shard(s) missing (first: {missing[0]}); "
                            "rerun `soflow encode-latents` to finish encoding")
        if not shards:
            raise DataError(f"{folder}: meta.json lists no shards; rerun `soflow encode-latents`")
        self.mean, self.std, labels = [], [], []
        for shard in shards:
            mean, std = npy_rows(shard / "mean.npy"), npy_rows(shard / "std.npy")
            try:
                lab = np.load(shard / "labels.npy", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"{shard / 'labels.npy'}: unreadable ({type(e).__name__}); "
                                "rerun `soflow encode-latents` for this shard") from None
            if (len(mean.shape) != 4 or std.shape != mean.shape or lab.shape != mean.shape[:1]
                    or mean.shape[1:] != (self.mean[0] if self.mean else mean).shape[1:]
                    or not np.issubdtype(lab.dtype, np.integer)):
                raise DataError(f"{shard}: mean {mean.shape}, std {std.shape}, labels {lab.dtype} {lab.shape}; "
                                "expected [n, C, H, W] twice and n integers, with the same C, H, W in every shard")
            self.mean.append(mean)
            self.std.append(std)
            labels.append(lab.astype(np.int64))
        self.labels = np.concatenate(labels)
        self.offsets = np.cumsum([0] + [len(m) for m in self.mean])
        self.num_classes = len(classes)
        self.sample_shape = tuple(self.mean[0].shape[1:])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of items idx, in the order of idx."""
        def read(parts: list[FileRows]) -> np.ndarray:
            out = np.empty((len(idx), *self.sample_shape), parts[0].dtype)
            return gather(parts, self.offsets, idx, out).astype(np.float32, copy=False)

        return read(self.mean), read(self.std)


class Hdf5Rows:
    """The reference `imagenet_latent.hdf5`: latents [N, 2C, H, W] (mean and std along the channels),
    labels, amount.  Validated once at open; rows are read per batch.

    A contiguous latents dataset (as h5py writes by default) is read with positional reads at its
    offset in the file; a chunked or compressed one through h5py, opened lazily once per process,
    so a forked worker never uses its parent's HDF5 handle.
    """

    def __init__(self, file: Path):
        self.file = file
        self._handle, self._pid = None, None
        try:
            import h5py  # noqa: F401
        except ImportError:
            raise DataError("reading .hdf5 latents needs h5py: pip install 'soflow[latents]'") from None
        f = self._open()
        missing = [k for k in ("latents", "labels", "amount") if k not in f]
        if missing:
            raise DataError(f"{file}: no dataset {missing[0]!r}; expected datasets latents, labels, amount")
        latents, labels = f["latents"], f["labels"]
        for name, ds in (("latents", latents), ("labels", labels), ("amount", f["amount"])):
            if not np.issubdtype(ds.dtype, np.number):
                raise DataError(f"{file}: dataset {name} has dtype {ds.dtype}; expected numbers")
        try:
            n = int(np.asarray(f["amount"]).reshape(-1)[0])
        except IndexError:
            raise DataError(f"{file}: dataset amount is empty; expected the number of stored items") from None
        if latents.ndim != 4 or latents.shape[1] % 2:
            raise DataError(f"{file}: latents have shape {latents.shape}; expected [N, 2C, H, W] (mean, std)")
        if labels.ndim not in (1, 2) or labels.size != labels.shape[0]:
            raise DataError(f"{file}: labels have shape {labels.shape}; expected [N] or [N, 1]")
        if not 0 < n <= min(latents.shape[0], labels.shape[0]):
            raise DataError(f"{file}: amount is {n} but latents hold {latents.shape[0]} rows and labels "
                            f"{labels.shape[0]}; expected 0 < amount <= both")
        self.labels = np.asarray(labels[:n], dtype=np.int64).reshape(-1)
        self.channels = latents.shape[1] // 2
        self.row_shape = tuple(latents.shape[1:])
        self.sample_shape = (self.channels, *latents.shape[2:])
        self.num_classes = 1000
        self.size = n
        offset = latents.id.get_offset()
        contiguous = latents.chunks is None and offset is not None and not latents.external
        self.raw = FileRows(file, offset, latents.dtype, (n, *self.row_shape)) if contiguous else None
        if self.raw is not None:  # positional reads from here on: no handle to keep
            self._handle.close()
            self._handle, self._pid = None, None

    def _open(self):
        if self._pid != os.getpid():
            import h5py

            try:
                self._handle = h5py.File(self.file, "r")
            except OSError as e:
                raise DataError(f"{self.file}: not a readable HDF5 file ({str(e).splitlines()[0][:120]})") from None
            self._pid = os.getpid()
        return self._handle

    def __len__(self) -> int:
        return self.size

    def read(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of items idx, in the order of idx."""
        if self.raw is not None:
            out = np.empty((len(idx), *self.row_shape), self.raw.dtype)
            rows = gather([self.raw], np.zeros(1, np.int64), idx, out)
        else:  # h5py selects increasing, unique indices only; a batch across an epoch end may repeat one
            unique, inverse = np.unique(idx, return_inverse=True)
            rows = self._open()["latents"][unique][inverse.reshape(-1)]
        rows = rows.astype(np.float32, copy=False)
        return rows[:, :self.channels], rows[:, self.channels:]

    def __getstate__(self):
        return {**self.__dict__, "_handle": None, "_pid": None}


class LatentData:
    """Posterior means and stds of VAE latents; each batch re-samples z = (mean + std eps) * 0.18215.

    Rows are read per batch from the files (memory stays flat in the dataset size) and come back in
    the random order of the data stream, even though stores are written sorted by class.
    """

    def __init__(self, path: str | None):
        if not path:
            raise DataError("data.name=imagenet-latents needs data.path: an encode-latents folder, the "
                            f"reference {HDF5_NAME}, or a folder holding it")
        path = Path(path)
        if path.is_dir() and not (path / "meta.json").is_file() and (path / HDF5_NAME).is_file():
            path = path / HDF5_NAME  # the reference's dataset_path convention
        if path.suffix in (".hdf5", ".h5") and path.is_file():
            self.rows = Hdf5Rows(path)
        elif path.is_dir():
            if not (path / "meta.json").is_file():
                raise DataError(f"{path}: no meta.json and no {HDF5_NAME}; expected the output folder of "
                                "`soflow encode-latents` or the reference latent file")
            self.rows = ShardRows(path)
        else:
            raise DataError(f"{path}: no such latent folder or .hdf5 file")
        self.labels, self.num_classes = self.rows.labels, self.rows.num_classes
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise DataError(f"{path}: labels out of range [0, {self.num_classes - 1}]")
        self.sample_shape = self.rows.sample_shape

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, seed: int, position: int, rank: int, world: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Stream order, not sorted: SoFlowLoss and MeanFlowLoss split a batch by row position.
        idx = epoch_indices(len(self), position, rank, world, n, seed).numpy()
        mean, std = (torch.from_numpy(a) for a in self.rows.read(idx))
        eps = torch.randn(mean.shape, generator=generator(seed, position, rank, 1))
        return (mean + std * eps) * SCALE, torch.from_numpy(self.labels[idx])
