"""Open a trained run for sampling: a run folder, a checkpoint file or a safetensors export."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

from ..errors import CheckpointError, ConfigError, UnreadableFile
from ..safeload import load_safetensors, safetensors_header
from ..solution import SolutionFlow
from ..threads import configure_threads
from .build import build_flow
from .checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint
from .config import Config, load


def load_run(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu",
             warn: Callable[[str], None] = print) -> tuple[Config, SolutionFlow, int]:
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
        blob = latest_checkpoint(path, warn=warn)  # not None: there are checkpoints, and not all are unreadable
    elif path.is_file():
        blob = read_checkpoint(path)
    else:
        raise CheckpointError(f"{path}: no such run folder or checkpoint file")
    where = blob.get("path", path)
    try:
        cfg = load(base=blob["config"])
    except ConfigError as e:
        raise CheckpointError(f"{where}: its config is not one soflow can use ({e})") from None
    state = blob["ema" if weights == "ema" else "net"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: not a soflow run checkpoint (its {weights} weights are not a mapping)")
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state.items()}
    flow = checked_flow(cfg, blob["sample_shape"], blob["num_classes"], shapes, where)
    flow.net.load_state_dict(state)
    return cfg, flow, _step(blob["step"], where)


def _load_export(path: Path, weights: str):
    if weights != "ema":
        raise CheckpointError(f"{path}: exports hold EMA weights only; use a checkpoint for --weights online")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such safetensors export")
    try:
        meta, header = safetensors_header(path)  # the description only: checked before anything is built
    except UnreadableFile as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    cfg, shape, classes, step = export_metadata(path, meta)
    flow = checked_flow(cfg, shape, classes, {k: shape for k, (_, shape) in header.items()}, path)
    try:
        state, _ = load_safetensors(path)
    except UnreadableFile as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    flow.net.load_state_dict(state)
    return cfg, flow, step


def export_metadata(path: Path, meta: dict) -> tuple[Config, object, object, int]:
    """(config, sample_shape, num_classes, step) from the metadata of a safetensors export; the sizes
    are checked against the file's tensors by `checked_flow`."""
    try:
        cfg: Config = load(base=json.loads(meta["config"]))
        return cfg, json.loads(meta["sample_shape"]), json.loads(meta["num_classes"]), _step(int(meta["step"]), path)
    except KeyError as e:
        raise CheckpointError(f"{path}: not a soflow safetensors export (no {e.args[0]!r} in its metadata)") from None
    except (ValueError, TypeError, RecursionError) as e:  # bad JSON or numbers, or a config soflow rejects
        raise CheckpointError(f"{path}: not a soflow safetensors export ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else 'bad metadata'})") from None


# The most numbers one sample may hold (4 x 1024 x 1024): a file cannot ask for samples that no
# batch could hold.  The largest recipe draws 4 x 32 x 32 latents.
MAX_SAMPLE_NUMEL = 1 << 22


def checked_flow(cfg: Config, sample_shape: object, num_classes: object, shapes: dict,
                 path: str | Path) -> SolutionFlow:
    """The SolutionFlow that `cfg`, `sample_shape` and `num_classes` (read from the file `path`)
    describe, built only once the file's tensors ({name: shape}) are known to fit it.  The sizes
    are first bounded by what the tensors hold, then the network is built on the meta device
    (shapes, no memory) and compared with them, so a file cannot make soflow allocate more than
    it holds itself.  Every refusal is one CheckpointError line naming the file."""
    sample_shape, num_classes = _checked_sizes(sample_shape, num_classes, shapes, path)
    _check_net_args(cfg.model.net_args, shapes, path)
    try:
        with torch.device("meta"):
            skeleton = build_flow(cfg, sample_shape, num_classes)
    except Exception as e:  # noqa: BLE001 (a file's settings that build nothing, whatever the network says)
        raise CheckpointError(f"{path}: its metadata describes no network soflow can build ({_first_line(e)})") from None
    check_tensors(skeleton.net, {k: None if v is None else _Shape(v) for k, v in shapes.items()}, path,
                  cfg.to_dict())
    return build_flow(cfg, sample_shape, num_classes)


class _Shape(tuple):
    """A tensor's shape standing for the tensor in `check_tensors` (no data)."""

    @property
    def shape(self):
        return tuple(self)


def _checked_sizes(sample_shape, num_classes, shapes: dict, path) -> tuple[tuple, int]:
    """sample_shape and num_classes as given by a file, refused unless they are positive integers
    (the class count: 0 or more) that its tensors could hold; also every number in model.net_args."""
    largest = _largest(shapes)
    ok = isinstance(sample_shape, (list, tuple)) and len(sample_shape) in (1, 3) and all(
        _is_int(n) and n >= 1 for n in sample_shape)
    if not ok or math.prod(sample_shape) > MAX_SAMPLE_NUMEL:
        raise CheckpointError(f"{path}: sample_shape {str(sample_shape)[:80]} is not a size soflow samples "
                              f"(one or three positive integers, at most {MAX_SAMPLE_NUMEL} numbers in all)")
    if not _is_int(num_classes) or not 0 <= num_classes <= largest:
        raise CheckpointError(f"{path}: num_classes {str(num_classes)[:80]} does not fit its tensors "
                              f"(0 for an unconditional model, at most {largest})")
    return tuple(sample_shape), num_classes


def _check_net_args(net_args: dict, shapes: dict, path) -> None:
    """Every number in model.net_args (widths, depths, patch sizes, ratios) at most the file's
    largest tensor dimension or tensor count: a network that fits the file has no larger one."""
    largest = _largest(shapes)
    beyond = _first_number_beyond(net_args, largest, "model.net_args")
    if beyond:
        raise CheckpointError(f"{path}: {beyond[0]} is {str(beyond[1])[:40]}, more than its tensors could hold "
                              f"(at most {largest}); the file does not describe its own weights")


def _first_number_beyond(value, limit: int, key: str):
    """(dotted key, number) of the first number in nested mappings and lists beyond +-limit, or None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if abs(value) <= limit else (key, value)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _first_number_beyond(v, limit, f"{key}.{k}" if isinstance(value, dict) else f"{key}[{k}]")
        if found:
            return found
    return None


def _largest(shapes: dict) -> int:
    """The largest tensor dimension of a file, or its number of tensors if that is larger."""
    return max([len(shapes), *(n for s in shapes.values() if s for n in s)], default=0)


def _step(step, path) -> int:
    if not _is_int(step) or step < 0:
        raise CheckpointError(f"{path}: its step {str(step)[:80]} is not a step count")
    return step


def _is_int(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:160]}" if text else type(e).__name__


NETWORK_SECTIONS = ("method", "model", "data")  # the config sections that decide a network's tensors


def check_tensors(net: torch.nn.Module, state: dict, path: str | Path, saved_config: dict,
                  config: dict | None = None) -> None:
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
    changed = [k for k in config_differences(saved_config, config) if k.split(".")[0] in NETWORK_SECTIONS]
    if changed:
        said = ", ".join(f"{k} is {config_value(config, k)!r} here but {config_value(saved_config, k)!r} in the checkpoint"
                         for k in changed[:3]) + (f" (and {len(changed) - 3} more)" if len(changed) > 3 else "")
        raise CheckpointError(f"{path}: tensors do not fit the network of this config: {said}; {misfits}; "
                              "resume without changing these settings, or train in a new --run-dir")
    raise CheckpointError(f"{path}: tensors do not fit the network of this config, although no method, model or "
                          f"data setting differs from the checkpoint's: {misfits}")


def tensor_misfits(net: torch.nn.Module, state: dict) -> str:
    """The first tensor of `state` that does not fit `net`, in the network's order, and how many
    more do not ("" if all fit)."""
    own = net.state_dict()
    shape = lambda x: tuple(x.shape) if isinstance(x, (torch.Tensor, _Shape)) else "not a tensor"  # noqa: E731
    problems = [f"{k} is missing from the file" if k not in state else
                f"{k} is {shape(state[k])} in the file but {tuple(v.shape)} in the network"
                for k, v in own.items() if k not in state or shape(state[k]) != tuple(v.shape)]
    problems += [f"{k} is in the file but not in the network" for k in state if k not in own]
    more = len(problems) - 1
    return (problems[0] + (f" (and {more} more)" if more > 0 else "")) if problems else ""


def config_differences(old: object, new: object, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [prefix.rstrip(".")] if old != new else []
    return [k for key in sorted(set(old) | set(new))
            for k in config_differences(old.get(key), new.get(key), f"{prefix}{key}.")]


def config_value(config: dict, dotted: str) -> object:
    """The value at dotted key `dotted` of a plain config dict, or None."""
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config
