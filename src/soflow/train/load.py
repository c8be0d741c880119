"""Open a trained run for sampling: a run folder, a checkpoint file or a safetensors export."""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
    from ..safeload import UnreadableFile, load_safetensors

    if weights != "ema":
        raise CheckpointError(f"{path}: exports hold EMA weights only; use a checkpoint for --weights online")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such safetensors export")
    try:
        state, meta = load_safetensors(path)
    except UnreadableFile as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        cfg: Config = load(base=json.loads(meta["config"]))
        shape, classes, step = tuple(json.loads(meta["sample_shape"])), int(meta["num_classes"]), int(meta["step"])
    except KeyError as e:
        raise CheckpointError(f"{path}: not a soflow safetensors export (no {e.args[0]!r} in its metadata)") from None
    except (ValueError, TypeError) as e:  # bad JSON or numbers in the metadata, or a config soflow rejects
        raise CheckpointError(f"{path}: not a soflow safetensors export ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else 'bad metadata'})") from None
    flow = build_flow(cfg, shape, classes)
    _check_tensors(flow.net, state, path)
    flow.net.load_state_dict(state)
    return cfg, flow.to(device).eval(), step


def _check_tensors(net: torch.nn.Module, state: dict, path: Path) -> None:
    """One line naming the first tensors of `state` that do not fit `net` (instead of the
    many-line error of load_state_dict)."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    problems = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
               ([f"unexpected {', '.join(unexpected[:3])}"] if unexpected else []) + \
               ([f"shape {', '.join(wrong[:3])}"] if wrong else [])
    if problems:
        raise CheckpointError(f"{path}: tensors do not fit the network of its config: {'; '.join(problems)}")
