"""Writing samples: .png (image grid or 2-D scatter), .npz (ADM-style uint8 NHWC `arr_0`),
.npy (raw float array), or a folder of PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .plots import image_grid, scatter_panels, to_uint8


def write_samples(out: str | Path, x: torch.Tensor) -> Path:
    out = Path(out)
    images = x.dim() == 4
    suffix = out.suffix.lower()
    if suffix == ".npy":
        _parent(out)
        np.save(out, x.detach().float().cpu().numpy())
    elif suffix == ".npz":
        _parent(out)
        np.savez(out, arr_0=to_uint8(x) if images else x.detach().float().cpu().numpy())
    elif suffix == ".png":
        if images:
            image_grid(out, x)
        elif x.shape[1] >= 2:
            scatter_panels(out, {f"{len(x)} samples": x[:, :2]})
        else:
            raise ValueError(f"--out {out}: cannot plot {x.shape[1]}-D points; use .npy or .npz")
    elif suffix == "":
        if not images:
            raise ValueError(f"--out {out}: a folder of PNGs needs image samples; use .npy or .npz for points")
        from PIL import Image

        out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(to_uint8(x)):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(out / f"{i:06d}.png")
    else:
        raise ValueError(f"--out {out}: unknown output type {suffix!r}; use .png, .npz, .npy or a folder")
    return out


def _parent(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
