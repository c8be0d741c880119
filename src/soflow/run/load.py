"""Open a trained run for sampling: a run folder, a checkpoint file or a safetensors export."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError, UnreadableFile
from ..threads import configure_threads
from .build import build_flow
from .checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint
from .config import Config, load


def load_run(path: str | Path, weights: str = "ema", device="cpu", warn=print):
    """(config, SolutionFlow, step) with the EMA (default) or online weights, on `device`, with the
    run's CPU thread choice (`train.threads`) applied."""
    path = Path(path)
    if weights not in ("ema", "online"):
        raise CheckpointError(f"--weights {weights!r}: choose ema or online")
    cfg, flow, step = _load_export(path, weights) if path.suffix == ".safetensors" else _load_checkpoint(path, weights, warn)
    configure_threads(cfg.train.threads, flow.net, torch.device(device))
    return cfg, flow.to(device).eval(), step


def _load_checkpoint(path: Path, weights: str, warn):
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
    state = blob["ema" if weights == "ema" else "net"]
    check_tensors(flow.net, state, blob.get("path", path), blob["config"])
    flow.net.load_state_dict(state)
    return cfg, flow, int(blob["step"])


def _load_export(path: Path, weights: str):
    from ..safeload import load_safetensors

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
    check_tensors(flow.net, state, path, cfg.to_dict())
    flow.net.load_state_dict(state)
    return cfg, flow, step


NETWORK_SECTIONS = ("method", "model", "data")  # the config sections that decide a network's tensors


def check_tensors(net: torch.nn.Module, state: dict, path, saved_config: dict, config: dict | None = None) -> None:
    """One CheckpointError line naming the first tensors of `state` (read from `path`) that do not
    fit `net`, instead of load_state_dict's error of dozens of lines.  `net` was built from
    `config`, or from the file's own `saved_config` when `config` is None; when the two differ,
    the line names the settings that do."""
    misfits = tensor_misfits(net, state)
    if not misfits:
        return
    if config is None:
        model = saved_config.get("model", {}) if isinstance(saved_config, dict) else {}
        raise CheckpointError(f"{path}: tensors do not fit the network of its own config (model.net "
                              f"{model.get('net')!r}, model.net_args {model.get('net_args')}): {misfits}")
    changed = [k for k in _differences(saved_config, config) if k.split(".")[0] in NETWORK_SECTIONS]
    if changed:
        said = ", ".join(f"{k} is {_lookup(config, k)!r} here but {_lookup(saved_config, k)!r} in the checkpoint"
                         for k in changed[:3]) + (f" (and {len(changed) - 3} more)" if len(changed) > 3 else "")
        raise CheckpointError(f"{path}: tensors do not fit the network of this config: {said}; {misfits}; "
                              "resume without changing these settings, or train in a new --run-dir")
    raise CheckpointError(f"{path}: tensors do not fit the network of this config, although no method, model or "
                          f"data setting differs from the checkpoint's: {misfits}")


def tensor_misfits(net: torch.nn.Module, state: dict) -> str:
    """The first tensor of `state` that does not fit `net`, in the network's order, and how many
    more do not ("" if all fit)."""
    own = net.state_dict()
    shape = lambda x: tuple(x.shape) if isinstance(x, torch.Tensor) else "not a tensor"  # noqa: E731
    problems = [f"{k} is missing from the file" if k not in state else
                f"{k} is {shape(state[k])} in the file but {tuple(v.shape)} in the network"
                for k, v in own.items() if k not in state or shape(state[k]) != tuple(v.shape)]
    problems += [f"{k} is in the file but not in the network" for k in state if k not in own]
    more = len(problems) - 1
    return (problems[0] + (f" (and {more} more)" if more > 0 else "")) if problems else ""


def _differences(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [prefix.rstrip(".")] if old != new else []
    return [k for key in sorted(set(old) | set(new))
            for k in _differences(old.get(key), new.get(key), f"{prefix}{key}.")]


def _lookup(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config
