"""Figures of samples: scatter plots for 2-D points, grids for images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter_panels(path: Path, panels: dict[str, torch.Tensor], lim: float | None = None) -> Path:
    """One scatter panel per entry (title -> [N, 2] points), same axes for all."""
    plt = _pyplot()
    arrays = {k: v.detach().float().cpu().numpy() for k, v in panels.items()}
    if lim is None:
        ref = next(iter(arrays.values()))
        lim = float(np.abs(ref).max()) * 1.15 + 1e-6
    fig, axes = plt.subplots(1, len(arrays), figsize=(3.2 * len(arrays), 3.4), squeeze=False)
    for ax, (title, pts) in zip(axes[0], arrays.items()):
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5, linewidths=0)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [N, C, H, W] -> uint8 [N, H, W, C] (round to nearest)."""
    x = (images.detach().float().cpu() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(path: Path, images: torch.Tensor, rows: int | None = None) -> Path:
    from PIL import Image

    arr = to_uint8(images)
    n, h, w, c = arr.shape
    rows = rows or int(np.ceil(np.sqrt(n)))
    cols = int(np.ceil(n / rows))
    canvas = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[r * h:(r + 1) * h, q * w:(q + 1) * w] = arr[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas[..., 0] if c == 1 else canvas).save(path)
    return path
