"""Open a trained run for sampling: a run folder, a checkpoint file or a safetensors export."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .build import build_flow
from .checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, read_checkpoint
from .config import Config, load


def load_run(path: str | Path, weights: str = "ema", device="cpu", warn=print):
    """(config, SolutionFlow, step) with the EMA (default) or online weights."""
    path = Path(path)
    if weights not in ("ema", "online"):
        raise CheckpointError(f"--weights {weights!r}: choose ema or online")
    if path.suffix == ".safetensors":
        return _load_export(path, weights, device)
    if path.is_dir():
        if not list_checkpoints(path):
            raise CheckpointError(f"{path}: no checkpoints in {path / 'checkpoints'}; pass a run folder, a ckpt-*.pt "
                                  "file or an exports/*.safetensors file")
        blob = latest_checkpoint(path, warn=warn)
        if blob is None:
            raise CheckpointError(f"{path}: every checkpoint is unreadable")
    elif path.is_file():
        blob = read_checkpoint(path)
    else:
        raise CheckpointError(f"{path}: no such run folder or checkpoint file")
    cfg = load(base=blob["config"])
    flow = build_flow(cfg, tuple(blob["sample_shape"]), int(blob["num_classes"]))
    flow.net.load_state_dict(blob["ema" if weights == "ema" else "net"])
    return cfg, flow.to(device).eval(), int(blob["step"])


def _load_export(path: Path, weights: str, device):
    if weights != "ema":
        raise CheckpointError(f"{path}: exports hold EMA weights only; use a checkpoint for --weights online")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        cfg: Config = load(base=json.loads(meta["config"]))
        shape, classes, step = tuple(json.loads(meta["sample_shape"])), int(meta["num_classes"]), int(meta["step"])
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a soflow safetensors export ({type(e).__name__})") from None
    flow = build_flow(cfg, shape, classes)
    flow.net.load_state_dict(state)
    return cfg, flow.to(device).eval(), step
