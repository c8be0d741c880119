"""SD-VAE latents: encoding an image folder, and training on the stored posteriors.

`encode_latents` writes, for each shard of the sorted image list, the VAE posterior mean and
std and the labels (`shard-XXXXX/{mean,std,labels}.npy`), skipping shards already written, with
the shards spread over torchrun ranks.  Training draws a fresh posterior sample each step,
z = (mean + std * eps) * 0.18215; sampling decodes z / 0.18215 with the same VAE.
The reference implementation's `imagenet_latent.hdf5` (datasets `latents` = [mean, std] along
channels, `labels`, `amount`, `latent_size`) is read as is.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..seeding import generator
from .sampler import DataError, epoch_indices

SCALE = 0.18215


def load_vae(path: str | None, device="cpu"):
    """diffusers' AutoencoderKL from a local folder (the sd-vae-ft-mse layout); never downloads."""
    if not path:
        raise DataError("a VAE folder is needed (data.vae / --vae): the local sd-vae-ft-mse directory "
                        "with config.json and the weights")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise DataError(f"{folder}: no config.json; expected a diffusers AutoencoderKL folder (e.g. sd-vae-ft-mse)")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise DataError("latents need diffusers: pip install 'soflow[latents]'") from None
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise DataError(f"{folder}: cannot load the VAE ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode(vae, z: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Latents (scaled by 0.18215) -> images in [-1, 1]."""
    out = [vae.decode(chunk / SCALE).sample.clamp(-1, 1) for chunk in z.split(batch_size)]
    return torch.cat(out)


def encode_latents(images, vae_path: str, out: str | Path, rank: int = 0, world: int = 1, shard_size: int = 1024,
                   batch_size: int = 32, device="cpu", log=print) -> int:
    """Encode an ImageFolder into shards under `out`; returns the number of shards this rank wrote."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vae = load_vae(vae_path, device)
    num_shards = (len(images) + shard_size - 1) // shard_size
    if rank == 0:
        meta = {"num_images": len(images), "num_shards": num_shards, "shard_size": shard_size,
                "classes": images.classes, "resolution": images.resolution}
        tmp = out / ".meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, out / "meta.json")
    written = 0
    for shard in range(rank, num_shards, world):
        final = out / f"shard-{shard:05d}"
        if (final / "labels.npy").is_file():
            continue  # done by an earlier (interrupted) run
        idx = range(shard * shard_size, min(len(images), (shard + 1) * shard_size))
        means, stds = [], []
        for start in range(0, len(idx), batch_size):
            x = torch.stack([images.load(i) for i in idx[start:start + batch_size]]).to(device)
            posterior = vae.encode(x.float() / 127.5 - 1).latent_dist
            means.append(posterior.mean.cpu().numpy())
            stds.append(posterior.std.cpu().numpy())
        tmp = out / f".shard-{shard:05d}.tmp{rank}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        np.save(tmp / "mean.npy", np.concatenate(means).astype(np.float32))
        np.save(tmp / "std.npy", np.concatenate(stds).astype(np.float32))
        np.save(tmp / "labels.npy", images.labels[list(idx)].numpy().astype(np.int64))  # written last: marks completion
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        written += 1
        log(f"rank {rank}: shard {shard + 1}/{num_shards} ({len(idx)} images)")
    return written


class LatentData:
    """Posterior means and stds of VAE latents; each batch re-samples z = (mean + std eps) * 0.18215."""

    def __init__(self, path: str | None):
        if not path:
            raise DataError("data.name=imagenet-latents needs data.path: an encode-latents folder or the "
                            "reference imagenet_latent.hdf5")
        path = Path(path)
        if path.suffix in (".hdf5", ".h5"):
            self._read_hdf5(path)
        elif path.is_dir():
            self._read_shards(path)
        else:
            raise DataError(f"{path}: no such latent folder or .hdf5 file")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise DataError(f"{path}: labels out of range [0, {self.num_classes - 1}]")
        self.sample_shape = tuple(self.mean.shape[1:])

    def _read_shards(self, folder: Path):
        meta_file = folder / "meta.json"
        if not meta_file.is_file():
            raise DataError(f"{folder}: no meta.json; expected the output folder of `soflow encode-latents`")
        meta = json.loads(meta_file.read_text())
        shards = [folder / f"shard-{i:05d}" for i in range(meta["num_shards"])]
        missing = [s.name for s in shards if not (s / "labels.npy").is_file()]
        if missing:
            raise DataError(f"{folder}: {len(missing)} shard(s) missing (first: {missing[0]}); "
                            "rerun `soflow encode-latents` to finish encoding")
        load = lambda name: np.concatenate([np.load(s / name, mmap_mode="r") for s in shards])
        self.mean, self.std, self.labels = load("mean.npy"), load("std.npy"), load("labels.npy")
        self.num_classes = len(meta["classes"])

    def _read_hdf5(self, path: Path):
        try:
            import h5py
        except ImportError:
            raise DataError("reading .hdf5 latents needs h5py: pip install 'soflow[latents]'") from None
        try:
            with h5py.File(path, "r") as f:
                n = int(np.asarray(f["amount"]))
                latents = np.asarray(f["latents"][:n], dtype=np.float32)
                self.labels = np.asarray(f["labels"][:n], dtype=np.int64).reshape(-1)
        except (OSError, KeyError) as e:
            raise DataError(f"{path}: expected datasets latents, labels, amount ({type(e).__name__}: {e})") from None
        if latents.ndim != 4 or latents.shape[1] % 2:
            raise DataError(f"{path}: latents have shape {latents.shape}; expected [N, 2C, H, W] (mean, std)")
        c = latents.shape[1] // 2
        self.mean, self.std = latents[:, :c], latents[:, c:]
        self.num_classes = 1000

    def __len__(self) -> int:
        return len(self.mean)

    def batch(self, seed: int, position: int, rank: int, world: int, n: int):
        idx = np.sort(epoch_indices(len(self.mean), position, rank, world, n, seed).numpy())
        mean, std = torch.from_numpy(np.asarray(self.mean[idx])), torch.from_numpy(np.asarray(self.std[idx]))
        eps = torch.randn(mean.shape, generator=generator(seed, position, rank, 1))
        return (mean + std * eps) * SCALE, torch.from_numpy(np.asarray(self.labels[idx]))
