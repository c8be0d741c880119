"""Writing samples: .png (image grid or 2-D scatter), .npz (ADM-style uint8 NHWC `arr_0`),
.npy (raw float array), or a folder of PNG files named by sample index.

`SampleOutput` writes one output from one or many processes with memory that does not grow
with the number of samples: each rank streams its contiguous range of samples, chunk by chunk,
into a part file (or into its own PNG files), and rank 0 assembles the parts by copying them in
fixed-size blocks.  Everything is written under temporary names in the output's folder (so the
folder must be one that every rank sees) and renamed at the end: an output exists under its name
only once it is complete.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from numpy.lib import format as npy_format

from .errors import ConfigError
from .plots import image_grid, plural, scatter_panels, to_uint8

COPY_BLOCK = 16 << 20  # bytes per read when parts are copied into the output
PLOT_BYTES = 1 << 31  # a .png figure loads its samples whole, as float32: at most this many bytes of them
# characters that the temporary names next to the output add to its name (see SampleOutput.part)
OUT_NAME_EXTRA = len("..0123456789ab.part0000.npy")


def output_kind(out: Path, sample_shape: tuple[int, ...]) -> str:
    """'npz' | 'npy' | 'png' | 'folder' for --out, or ValueError if it cannot hold these samples."""
    images = len(sample_shape) == 3
    suffix = out.suffix.lower()
    if suffix in (".npz", ".npy"):
        return suffix[1:]
    if suffix == ".png":
        if not images and sample_shape[0] < 2:
            raise ConfigError(f"--out {out}: cannot plot {sample_shape[0]}-D points; use .npy or .npz")
        return "png"
    if suffix == "":
        if not images:
            raise ConfigError(f"--out {out}: a folder of PNGs needs image samples; use .npy or .npz for points")
        return "folder"
    raise ConfigError(f"--out {out}: unknown output type {suffix!r}; use .png, .npz, .npy or a folder")


def rank_range(num: int, world: int, rank: int, batch_size: int) -> tuple[int, int]:
    """Sample indices [first, last) of one rank: a contiguous run of whole batches of the global grid
    (batch k holds samples [k b, (k + 1) b)), spread as evenly as whole batches allow.  Every rank
    then evaluates exactly the batches one process would, so results agree bit for bit rather than
    to the rounding of batch-size-dependent kernels."""
    batches = -(-num // batch_size)
    lo, hi = rank * batches // world, (rank + 1) * batches // world
    return min(num, lo * batch_size), min(num, hi * batch_size)


class SampleOutput:
    """One output of `num` samples written by `world` ranks.  `token`, the same on every rank and
    unique to the invocation, names the temporary files next to the output."""

    def __init__(self, out: str | Path, sample_shape: Sequence[int], num: int, world: int, batch_size: int, token: str,
                 title: str | None = None):
        if num < 1:
            raise ConfigError(f"--num must be >= 1, got {num}")
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
        self.out = Path(out)
        self.kind = output_kind(self.out, tuple(sample_shape))
        self.num, self.world, self.batch_size, self.token = num, world, batch_size, token
        self.images = len(sample_shape) == 3
        self.sample_shape = tuple(sample_shape)
        self.title = title  # of a .png figure: how the samples were drawn

    # names -----------------------------------------------------------------------------------
    def range(self, rank: int) -> tuple[int, int]:
        return rank_range(self.num, self.world, rank, self.batch_size)

    def part(self, rank: int) -> Path:
        return self.out.with_name(f".{self.out.name}.{self.token}.part{rank:04d}.npy")

    @property
    def staging(self) -> Path:
        """The output under construction; files keep their suffix, which PIL and matplotlib read."""
        if self.kind == "folder":
            return self.out.with_name(f".{self.out.name}.{self.token}.tmp")
        return self.out.with_name(f".{self.out.stem}.{self.token}.tmp{self.out.suffix}")

    # writing ---------------------------------------------------------------------------------
    def check_destination(self) -> None:
        """Refuse, before any sampling, a destination the final rename could not replace."""
        if self.kind == "folder":
            if self.out.exists() and not self.out.is_dir():
                raise ConfigError(f"--out {self.out}: exists and is not a folder; choose another name")
            if self.out.is_dir() and any(self.out.iterdir()):
                raise ConfigError(f"--out {self.out}: folder exists and is not empty; remove it or choose a new "
                                  "name (old images would mix with the new ones)")
        elif self.out.is_dir():
            raise ConfigError(f"--out {self.out}: is a folder; give a file name ending in .{self.kind}")
        with failed_writes_as_errors(self.out.parent):
            self.out.parent.mkdir(parents=True, exist_ok=True)

    def bytes_needed(self) -> int:
        """Disk space the output takes while it is assembled: the parts and the output (a folder of
        PNGs, about its raw pixels; a figure, little)."""
        numel = math.prod(self.sample_shape)
        raw = self.num * numel * (1 if self.kind in ("folder", "png") or (self.kind == "npz" and self.images) else 4)
        return {"folder": raw, "png": 4 * self.num * numel}.get(self.kind, 2 * raw)

    def check_space(self) -> None:
        """Refuse, before any sampling, an output that the disk (or, for a figure, memory) cannot hold."""
        need = self.bytes_needed()
        if self.kind == "png" and need > PLOT_BYTES:
            raise ConfigError(f"--num {self.num}: a .png figure holds at most {PLOT_BYTES // need * self.num or 1} of "
                              "these samples; write .npy or .npz for more")
        free = shutil.disk_usage(self.out.parent).free
        if need > free:
            raise ConfigError(f"--out {self.out}: {self.num} samples need about {_size(need)} while it is written, and "
                              f"{self.out.parent} has {_size(free)} free; lower --num or choose another place")

    def writer(self, rank: int) -> _PartFile | _PngFiles:
        """The object that takes this rank's samples, chunk by chunk, in index order."""
        first, last = self.range(rank)
        if self.kind == "folder":
            return _PngFiles(self.staging, first, last)
        to_array = _uint8_nhwc if (self.kind == "npz" and self.images) else _float32
        return _PartFile(self.part(rank), last - first, to_array)

    # assembling (rank 0, after every rank closed its writer) ------------------------------------
    def assemble(self) -> Path:
        try:
            with failed_writes_as_errors(self.out):
                if self.kind == "folder":
                    self._check_folder()
                    os.replace(self.staging, self.out)  # onto a missing or empty folder
                else:
                    parts = self._parts()
                    if self.kind == "png":
                        self._plot(parts)
                    else:
                        with open(self.staging, "wb") as f:
                            if self.kind == "npz":
                                self._zip(f, parts)
                            else:
                                _copy_parts(f, parts)
                            f.flush()
                            os.fsync(f.fileno())
                    os.replace(self.staging, self.out)
        finally:
            self.discard()
        return self.out

    def discard(self) -> None:
        """Remove every temporary file of this output (parts of all ranks and the staging output)."""
        for rank in range(self.world):
            self.part(rank).unlink(missing_ok=True)
        if self.staging.is_dir():
            shutil.rmtree(self.staging, ignore_errors=True)
        else:
            self.staging.unlink(missing_ok=True)

    def _parts(self) -> list[tuple[Path, int, tuple, np.dtype]]:
        """(path, data offset, shape, dtype) of each non-empty rank's part, checked against its range."""
        parts = []
        for rank in range(self.world):
            first, last = self.range(rank)
            if last == first:
                continue
            path = self.part(rank)
            if not path.is_file():
                raise ConfigError(f"--out {self.out}: the samples of rank {rank} are missing ({path.name}); the "
                                  "output folder must be on a file system that every rank sees")
            offset, shape, dtype = _read_header(path)
            complete = path.stat().st_size - offset == int(np.prod(shape)) * dtype.itemsize
            unlike = parts and (shape[1:], dtype) != (parts[0][2][1:], parts[0][3])
            if not complete or shape[0] != last - first or unlike:
                raise ConfigError(f"--out {self.out}: part {path.name} holds {shape} {dtype}, expected "
                                  f"{last - first} samples like the other parts")
            parts.append((path, offset, shape, dtype))
        return parts

    def _zip(self, f, parts) -> None:
        """The bytes numpy.savez(arr_0=...) writes (one stored zip64 entry with zipfile's fixed 1980
        time stamp, so equal samples give equal files), with arr_0.npy streamed from the parts."""
        info = zipfile.ZipInfo("arr_0.npy")
        info.compress_type, info.external_attr = zipfile.ZIP_STORED, 0o600 << 16
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open(info, "w", force_zip64=True) as entry:
                _copy_parts(entry, parts)

    def _plot(self, parts) -> None:
        """Grid or scatter: meant for small N, so the samples are loaded whole, on rank 0 only."""
        x = torch.from_numpy(np.concatenate([np.load(path) for path, *_ in parts]))
        if self.images:
            image_grid(self.staging, x, title=self.title)
        else:
            scatter_panels(self.staging, {plural(len(x), "sample"): x[:, :2]}, title=self.title)

    def _check_folder(self) -> None:
        found = sum(1 for _ in self.staging.glob("*.png")) if self.staging.is_dir() else 0
        if found != self.num:
            raise ConfigError(f"--out {self.out}: {found} of {self.num} images were written; the output folder must "
                              "be on a file system that every rank sees")


def _size(n: int) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"


def _uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    return to_uint8(x)


def _float32(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


class _PartFile:
    """One rank's samples as an .npy file written front to back: header first (its shape is known
    from the rank's range and the first chunk), then each chunk's bytes."""

    def __init__(self, path: Path, count: int, to_array):
        self.path, self.count, self.to_array = path, count, to_array
        self.file, self.written = None, 0

    def write(self, x: torch.Tensor) -> None:
        arr = np.ascontiguousarray(self.to_array(x))
        with failed_writes_as_errors(self.path):
            if self.file is None:
                self.file = open(self.path, "wb")
                npy_format.write_array_header_1_0(self.file, {"descr": npy_format.dtype_to_descr(arr.dtype),
                                                              "fortran_order": False,
                                                              "shape": (self.count, *arr.shape[1:])})
            self.file.write(arr.tobytes())
        self.written += len(arr)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb) -> None:
        try:
            if self.file is not None:
                with failed_writes_as_errors(self.path):
                    self.file.close()  # flushes the last bytes: a full disk can show here first
        except ValueError:
            self.path.unlink(missing_ok=True)
            if kind is None:
                raise
        if kind is not None:
            self.path.unlink(missing_ok=True)
        elif self.written != self.count:
            self.path.unlink(missing_ok=True)
            raise RuntimeError(f"{self.path.name}: {self.written} samples written, {self.count} expected")


class _PngFiles:
    """One rank's images as PNG files named by global sample index in the shared staging folder."""

    def __init__(self, folder: Path, first: int, last: int):
        self.folder, self.first, self.next, self.last = folder, first, first, last
        with failed_writes_as_errors(folder):
            folder.mkdir(parents=True, exist_ok=True)

    def write(self, x: torch.Tensor) -> None:
        from PIL import Image

        for img in to_uint8(x):
            path = self.folder / f"{self.next:06d}.png"
            self.next += 1  # counted before the write, so a failed one is taken back too
            with failed_writes_as_errors(path):
                Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:  # take back this rank's files; rank 0 removes the folder itself
            for i in range(self.first, self.next):
                (self.folder / f"{i:06d}.png").unlink(missing_ok=True)


@contextlib.contextmanager
def failed_writes_as_errors(path: str | Path) -> Iterator[None]:
    """An OSError while writing `path` (a full disk, a missing permission) as one ConfigError line,
    which the command line prints as it is."""
    try:
        yield
    except OSError as e:
        raise ConfigError(f"could not write {path}: {e.strerror or e}") from None


def write_figure(path: str | Path, draw: Callable[..., object], *args, **kwargs) -> Path:
    """`draw(file, *args, **kwargs)` (a figure function of soflow.plots) into a temporary file next
    to `path`, then renamed over it, so a figure is never seen half-written.  The temporary name
    keeps the suffix, from which PIL and matplotlib choose the format.  An OSError is one line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        with failed_writes_as_errors(path):
            draw(tmp, *args, **kwargs)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _read_header(path: Path) -> tuple[int, tuple, np.dtype]:
    with open(path, "rb") as f:
        npy_format.read_magic(f)
        shape, _, dtype = npy_format.read_array_header_1_0(f)
        return f.tell(), shape, dtype


def _copy_parts(dst, parts) -> None:
    """One .npy (header for the whole array, then each part's data in rank order) into dst."""
    first = parts[0]
    total = sum(shape[0] for _, _, shape, _ in parts)
    npy_format.write_array_header_1_0(dst, {"descr": npy_format.dtype_to_descr(first[3]), "fortran_order": False,
                                            "shape": (total, *first[2][1:])})
    for path, offset, _, _ in parts:
        with open(path, "rb") as f:
            f.seek(offset)
            shutil.copyfileobj(f, dst, COPY_BLOCK)
