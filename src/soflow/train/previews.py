"""Sample figures written while training: EMA samples with fixed seeds at each configured NFE."""

from __future__ import annotations

from pathlib import Path

import torch

from ..distributed import Env
from ..pipeline import Pipeline
from ..plots import image_grid, sample_title, scatter_panels
from ..protocols import Dataset
from ..writers import write_figure
from . import parallel
from .runlog import RunLog


def write_previews(pipe: Pipeline, data: Dataset, folder: Path, step: int, log: RunLog, env: Env) -> list[Path]:
    """A scatter plot for 2-D data (data and every NFE side by side), an image grid per NFE (one row
    per class, at most 10) otherwise.  Sharded models sample on every rank; rank 0 writes."""
    if not (env.is_main or parallel.is_sharded(pipe.flow.net)):
        return []
    if pipe.is_latent and not pipe.vae_path:
        return []  # no decoder: nothing to look at (the trainer said so once at start)
    cfg = pipe.config
    seed, k, mode = cfg.train.seed, data.num_classes, cfg.train.sample_mode
    if pipe.is_points:
        n = cfg.train.sample_num
        panels = {"data": data.reference(n)}
        panels.update({sample_title(cfg.method, nfe, mode): pipe.sample(n, nfe, seed=seed, mode=mode)[:, :2].cpu()
                       for nfe in cfg.train.sample_nfe})
        paths = [write_figure(folder / f"step{step:08d}.png", scatter_panels, panels,
                              title=f"step {step}, EMA weights")] if env.is_main else []
    else:
        classes = torch.linspace(0, k - 1, min(k, 10)).round().long() if k else None
        labels = classes.repeat_interleave(10) if k else None
        grids = {nfe: pipe.sample(len(labels) if k else 64, nfe, seed=seed, labels=labels, mode=mode)
                 for nfe in cfg.train.sample_nfe}
        paths = [write_figure(folder / f"step{step:08d}-nfe{nfe}.png", image_grid, x,
                              rows=len(classes) if k else None,
                              title=sample_title(cfg.method, nfe, mode, step=step, weights="ema"))
                 for nfe, x in grids.items()] if env.is_main else []
    for p in paths:
        log.samples(p)
    return paths
