"""The SD-VAE (diffusers' AutoencoderKL, from a local folder): encoding an image folder into latent
shards, and decoding sampled latents.  Latents are scaled by SCALE = 0.18215 for training."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..errors import DataError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from .images import ImageFolder

SCALE = 0.18215


def load_vae(path: str | None, device: str | torch.device = "cpu") -> AutoencoderKL:
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
def decode(vae: AutoencoderKL, z: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Latents (scaled by 0.18215) -> images in [-1, 1]."""
    out = [vae.decode(chunk / SCALE).sample.clamp(-1, 1) for chunk in z.split(batch_size)]
    return torch.cat(out)


def encode_latents(images: ImageFolder, vae_path: str, out: str | Path, rank: int = 0, world: int = 1,
                   shard_size: int = 1024, batch_size: int = 32, device: str | torch.device = "cpu",
                   log: Callable[[str], None] = print) -> int:
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
        log(f"rank {rank}: shard {shard + 1}/{num_shards} ({len(idx)} image{'' if len(idx) == 1 else 's'})")
    return written
