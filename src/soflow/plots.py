"""Figures of samples: scatter plots for 2-D points, grids for images.

Each figure can carry a title saying how its samples were drawn (`sample_title`), stored as the
PNG's `Title` text entry (image viewers show it; PIL reads it as `Image.open(f).text["Title"]`).
A scatter plot also shows it above its panels; an image grid keeps its pixels to the images
alone, so that cell (r, c) is exactly rows r*H..(r+1)*H, columns c*W..(c+1)*W.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .methods import method as method_named
from .sampling import evaluations


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sample_title(method: str, nfe: int, mode: str | None = None, step: int | None = None,
                 guidance: float | None = None, weights: str | None = None, label: int | None = None) -> str:
    """How samples were drawn, e.g. "1 NFE, renoise, class 3, step 4000, EMA weights".

    `mode` None stands for the method's default sampler (soflow.methods).  `nfe` counts steps; the
    title gives the network evaluations (soflow.sampling.evaluations: Heun spends 2 nfe - 1).
    """
    if mode is None:
        mode = method_named(method).modes[0]
    if mode == "heun":
        parts = [f"{evaluations(nfe, mode)} NFE", f"heun, {plural(nfe, 'step')}"]
    else:
        parts = [f"{nfe} NFE", mode]
    if label is not None:
        parts.append(f"class {label}")
    if guidance is not None and guidance != 1.0:
        parts.append(f"guidance {guidance:g}")
    if step is not None:
        parts.append(f"step {step}")
    if weights:
        parts.append("EMA weights" if weights == "ema" else f"{weights} weights")
    return ", ".join(parts)


def plural(n: int, noun: str) -> str:
    """'1 step', '2 steps' (nouns with a plain -s plural)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def scatter_panels(path: Path, panels: dict[str, torch.Tensor], lim: float | None = None,
                   title: str | None = None) -> Path:
    """One scatter panel per entry (panel title -> [N, 2] points), same axes for all; `title` goes
    above the panels and into the PNG's Title entry."""
    plt = _pyplot()
    arrays = {k: v.detach().float().cpu().numpy() for k, v in panels.items()}
    if lim is None:
        ref = next(iter(arrays.values()))
        lim = float(np.abs(ref).max()) * 1.15 + 1e-6
    fig, axes = plt.subplots(1, len(arrays), figsize=(3.2 * len(arrays), 3.4), squeeze=False)
    for ax, (name, pts) in zip(axes[0], arrays.items()):
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5, linewidths=0)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Title": title} if title else None)
    plt.close(fig)
    return path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [N, C, H, W] -> uint8 [N, H, W, C] (round to nearest)."""
    x = (images.detach().float().cpu() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(path: Path, images: torch.Tensor, rows: int | None = None, title: str | None = None) -> Path:
    """Images [N, C, H, W] in [-1, 1] as a grid, row by row; `title` goes into the PNG's Title entry."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    arr = to_uint8(images)
    n, h, w, c = arr.shape
    rows = rows or int(np.ceil(np.sqrt(n)))
    cols = int(np.ceil(n / rows))
    canvas = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[r * h:(r + 1) * h, q * w:(q + 1) * w] = arr[i]
    image = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    info = None
    if title:
        info = PngInfo()
        info.add_text("Title", title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)
    return path
