"""Run checkpoints: atomic writes, tensors and plain values only, newest-valid resume, pruning,
and safetensors exports with the config as metadata."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

FORMAT = "soflow-checkpoint-1"
NAME = re.compile(r"^ckpt-(\d+)\.pt$")
REQUIRED = ("format", "step", "config", "sample_shape", "num_classes", "net", "ema", "optimizer", "rng")


class CheckpointError(ValueError):
    pass


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file, newest first."""
    folder = checkpoint_dir(run_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("ckpt-*.pt") if (m := NAME.match(p.name))] if folder.is_dir() else []
    return sorted(found, reverse=True)


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file in the same folder, flush to disk, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(run_dir: Path, state: dict, keep_last: int, keep_every: int) -> Path:
    path = checkpoint_dir(run_dir) / f"ckpt-{state['step']:08d}.pt"
    atomic_save({"format": FORMAT, **state}, path)
    prune(run_dir, keep_last, keep_every, protect=path)
    return path


def prune(run_dir: Path, keep_last: int, keep_every: int, protect: Path) -> None:
    for i, (step, path) in enumerate(list_checkpoints(run_dir)):
        keep = i < keep_last or (keep_every and step % keep_every == 0) or path == protect
        if not keep:
            path.unlink(missing_ok=True)


def read_checkpoint(path: Path) -> dict:
    """Load one checkpoint file (weights_only) and check it is a soflow run checkpoint."""
    from ..safeload import UnreadableFile, load_torch

    path = Path(path)
    try:
        blob = load_torch(path)
    except UnreadableFile as e:
        if e.holds_objects:
            raise CheckpointError(f"{path}: not a soflow run checkpoint: {e}") from None
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or any(k not in blob for k in REQUIRED):
        raise CheckpointError(f"{path}: not a soflow run checkpoint (use `soflow convert-reference` for reference checkpoints)")
    return blob


def latest_checkpoint(run_dir: Path, warn=print, quarantine: bool = False) -> dict | None:
    """The newest readable checkpoint of a run; unreadable newer ones are reported and skipped.

    quarantine=True (the trainer's main rank) renames them to `*.pt.corrupt`, so that pruning
    keeps counting good checkpoints only; nothing is deleted.
    """
    for step, path in list_checkpoints(run_dir):
        try:
            blob = read_checkpoint(path)
        except CheckpointError as e:
            if quarantine:
                os.replace(path, path.with_name(path.name + ".corrupt"))
            warn(f"warning: {e}; falling back to an older checkpoint" + (" (kept as *.corrupt)" if quarantine else ""))
            continue
        blob["path"] = str(path)
        return blob
    return None


BEST_FID = "best-fid"  # checkpoints/best-fid.pt and .json; not a ckpt-*.pt name, so resume and pruning skip it


def best_fid_paths(run_dir: Path) -> tuple[Path, Path]:
    """(checkpoint, summary) of the best-FID EMA weights of a run."""
    folder = checkpoint_dir(run_dir)
    return folder / f"{BEST_FID}.pt", folder / f"{BEST_FID}.json"


def save_best_fid(run_dir: Path, state: dict, record: dict) -> Path:
    """Write the checkpoint whose EMA scored the best FID so far, then a JSON summary of `record`
    (step, metric, score, ...); both replace the previous ones atomically.  The checkpoint carries
    `record` itself under "fid", so it is the one source of the best score on resume."""
    path, summary = best_fid_paths(run_dir)
    atomic_save({"format": FORMAT, **state, "fid": record}, path)
    tmp = summary.with_name(f".{summary.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({**record, "checkpoint": path.name}, indent=1) + "\n")
        os.replace(tmp, summary)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_best_fid(run_dir: Path) -> dict | None:
    """The "fid" record of checkpoints/best-fid.pt, or None when the run has none.  The file is
    memory-mapped, so its weights are not read."""
    from ..safeload import describe

    path, _ = best_fid_paths(run_dir)
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable ({describe(e)})") from None
    record = blob.get("fid") if isinstance(blob, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("score"), float):
        raise CheckpointError(f"{path}: no FID record in it")
    return record


def export_safetensors(path: Path, state: dict, config: dict, step: int, sample_shape, num_classes: int) -> Path:
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"config": json.dumps(config), "step": str(step), "format": FORMAT,
                                               "sample_shape": json.dumps(list(sample_shape)),
                                               "num_classes": str(num_classes)})
    os.replace(tmp, path)
    return path


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
