"""Write a synthetic latent store in class order, the way real stores are laid out.

`encode-latents` encodes the sorted ImageFolder, and the reference `imagenet_latent.hdf5` is sorted
by class too, so item i belongs to class i * K // N here.  Means are standard normal, stds 0.1.
Written block by block, so the writer's memory does not grow with N.

    python benchmarks/write_latents.py --format folder --n 1000000 --out /tmp/store-folder
    python benchmarks/write_latents.py --format hdf5 --n 1000000 --out /tmp/store-hdf5
        # -> /tmp/store-hdf5/imagenet_latent.hdf5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def class_ordered_labels(start: int, stop: int, n: int, classes: int) -> np.ndarray:
    """Labels of items start..stop-1 of a store of n items sorted by class, classes near-equal in size."""
    return (np.arange(start, stop, dtype=np.int64) * classes) // n


def _block(rng: np.random.Generator, m: int, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    mean = rng.standard_normal((m, *shape), dtype=np.float32)
    return mean, np.full((m, *shape), 0.1, np.float32)


def write_folder(out: Path, n: int, classes: int = 1000, shape=(4, 8, 8), shard_size: int = 1024,
                 seed: int = 0) -> Path:
    """The `soflow encode-latents` layout: meta.json and shard-XXXXX/{mean,std,labels}.npy."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    num_shards = (n + shard_size - 1) // shard_size
    for i in range(num_shards):
        lo, hi = i * shard_size, min(n, (i + 1) * shard_size)
        shard = out / f"shard-{i:05d}"
        shard.mkdir(exist_ok=True)
        mean, std = _block(rng, hi - lo, shape)
        np.save(shard / "mean.npy", mean)
        np.save(shard / "std.npy", std)
        np.save(shard / "labels.npy", class_ordered_labels(lo, hi, n, classes))
    meta = {"num_images": n, "num_shards": num_shards, "shard_size": shard_size,
            "classes": [f"n{k:08d}" for k in range(classes)], "resolution": shape[-1] * 8}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def write_hdf5(file: Path, n: int, classes: int = 1000, shape=(4, 8, 8), block: int = 8192, seed: int = 0) -> Path:
    """The reference layout: latents [N, 2C, H, W] (mean, std along channels), labels, amount, latent_size."""
    import h5py

    file.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    c, h, w = shape
    with h5py.File(file, "w") as f:
        latents = f.create_dataset("latents", (n, 2 * c, h, w), dtype="f4")
        labels = f.create_dataset("labels", (n,), dtype="i8")
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            mean, std = _block(rng, hi - lo, shape)
            latents[lo:hi] = np.concatenate([mean, std], axis=1)
            labels[lo:hi] = class_ordered_labels(lo, hi, n, classes)
        f["amount"] = n
        f["latent_size"] = h
    return file


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", choices=("folder", "hdf5"), required=True)
    ap.add_argument("--n", type=int, required=True, help="number of items")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--shape", type=int, nargs=3, default=(4, 8, 8), metavar=("C", "H", "W"))
    ap.add_argument("--out", required=True, help="folder (hdf5: the folder that receives imagenet_latent.hdf5)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.format == "folder":
        print(write_folder(out, args.n, args.classes, tuple(args.shape)))
    else:
        print(write_hdf5(out / "imagenet_latent.hdf5", args.n, args.classes, tuple(args.shape)))


if __name__ == "__main__":
    main()
