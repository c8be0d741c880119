"""Run checkpoints: atomic writes, tensors and plain values only, newest-valid resume, pruning,
and safetensors exports with the config as metadata.

Every file is written under a temporary name next to its destination (`.NAME.PID.tmp`), flushed
to disk and renamed over the destination, so a reader sees the old file or the new one, never a
part.  A writer killed mid-write leaves its temporary file; the trainer removes those when it
starts (it holds the run folder's lock then, so no other writer is alive).  A failed write (a
full disk) is one CheckpointError naming the file and the system's reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from ..errors import CheckpointError, UnreadableFile
from ..safeload import load_torch

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

FORMAT = "soflow-checkpoint-1"
NAME = re.compile(r"^ckpt-(\d+)\.pt$")
REQUIRED = ("format", "step", "config", "sample_shape", "num_classes", "net", "ema", "optimizer", "rng")
# Temporary names of the files a trainer writes: `.NAME.PID.tmp` (`written_atomically`) in
# checkpoints/ and exports/, `.NAME.PID.tmp.png` (soflow.writers.write_figure) in samples/.
TEMPORARY = re.compile(r"^\.(ckpt-\d+\.pt|best-fid\.pt|best-fid\.json|ema-\d+\.safetensors|step\d+(-nfe\d+)?\.png)"
                       r"\.\d+\.tmp(\.png)?$")
RUN_FOLDERS = ("checkpoints", "exports", "samples")


def checkpoint_dir(run_dir: Path) -> Path:
    """The checkpoints/ folder of a run folder."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file, newest first."""
    folder = checkpoint_dir(run_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("ckpt-*.pt") if (m := NAME.match(p.name))] if folder.is_dir() else []
    return sorted(found, reverse=True)


# ---------------------------------------------------------------------------------------- writing


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


class _Recorded:
    """A file whose first failed write is kept: torch.save's zip writer turns an OSError from
    `write` into "unexpected pos ..." and drops the reason (a full disk, a quota)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


@contextlib.contextmanager
def written_atomically(path: Path, what: str) -> Iterator[_Recorded]:
    """`with written_atomically(path, "checkpoint") as f: f.write(...)` puts the bytes at `path`
    whole or not at all.  The file gets the mode of any new file (0666 less the umask).  Any
    failure removes the temporary file; an OSError (also one raised inside a writer that hides
    it, like torch.save) becomes one CheckpointError: "could not write <what> <path>: <reason>"."""
    path = Path(path)
    tmp = _temporary(path)
    f = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as raw:
            f = _Recorded(raw)
            yield f
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except OSError as e:
        raise CheckpointError(f"could not write {what} {path}: {_reason(e)}") from e
    except Exception:
        if f is not None and f.error is not None:
            raise CheckpointError(f"could not write {what} {path}: {_reason(f.error)}") from f.error
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _sync_folder(folder: Path) -> None:
    """Make a rename durable (a crash of the machine, not just of the process, keeps it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename itself has happened
    finally:
        os.close(fd)


def atomic_save(obj: dict, path: Path, what: str = "checkpoint") -> None:
    """torch.save `obj` to `path` atomically (see `written_atomically`)."""
    with written_atomically(path, what) as f:
        torch.save(obj, f)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files that killed writers left in the run folder; only for a process
    that holds the run folder's lock (no other writer can be alive).  Returns what was removed."""
    removed = []
    for name in RUN_FOLDERS:
        folder = Path(run_dir) / name
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            if TEMPORARY.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def run_state(step: int, config: dict, sample_shape: Sequence[int], num_classes: int, net: dict, ema: dict,
              optimizer: dict | None = None, rng: list | None = None, world_size: int = 0) -> dict:
    """The contents of a run checkpoint (the one place its layout is written).  Without optimizer
    and RNG state (converted or best-FID checkpoints) it still opens for sampling, and a resume
    starts a fresh optimizer and fresh random streams."""
    return {"step": step, "config": config, "sample_shape": list(sample_shape), "num_classes": num_classes,
            "net": net, "ema": ema, "optimizer": optimizer or {}, "rng": rng or [], "world_size": world_size}


def save_checkpoint(run_dir: Path, state: dict, keep_last: int, keep_every: int) -> Path:
    """Write the checkpoint of `state` atomically and prune older ones; returns its path."""
    path = checkpoint_dir(run_dir) / f"ckpt-{state['step']:08d}.pt"
    try:
        atomic_save({"format": FORMAT, **state}, path)
    except CheckpointError as e:
        kept = list_checkpoints(run_dir)  # the failed write replaced none of them
        last = f"the last good checkpoint is step {kept[0][0]} ({kept[0][1]})" if kept else "no checkpoint was written"
        raise CheckpointError(f"{e}; {last}") from e.__cause__
    prune(run_dir, keep_last, keep_every, protect=path)
    return path


def prune(run_dir: Path, keep_last: int, keep_every: int, protect: Path) -> None:
    """Delete checkpoints beyond the newest `keep_last`, keeping multiples of `keep_every` and `protect`."""
    for i, (step, path) in enumerate(list_checkpoints(run_dir)):
        keep = i < keep_last or (keep_every and step % keep_every == 0) or path == protect
        if not keep:
            path.unlink(missing_ok=True)


def read_checkpoint(path: Path) -> dict:
    """Load one checkpoint file (weights_only) and check it is a soflow run checkpoint."""
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


def latest_checkpoint(run_dir: Path, warn: Callable[[str], None] = print, quarantine: bool = False) -> dict | None:
    """The newest readable checkpoint of a run (None when it has none); unreadable newer ones are
    reported and skipped.  A run whose checkpoints are all unreadable is one CheckpointError
    naming them: starting over from step 0 is the user's decision, never a silent one.

    quarantine=True (the trainer's main rank) renames the skipped ones to `*.pt.corrupt`, so that
    pruning keeps counting good checkpoints only; nothing is deleted.
    """
    bad = []
    for step, path in list_checkpoints(run_dir):
        try:
            blob = read_checkpoint(path)
        except CheckpointError as e:
            bad.append((path, e))
            continue
        for skipped, e in bad:
            if quarantine:
                os.replace(skipped, skipped.with_name(skipped.name + ".corrupt"))
            warn(f"warning: {e}; falling back to step {step}" + (" (kept as *.corrupt)" if quarantine else ""))
        blob["path"] = str(path)
        return blob
    if bad:
        names = ", ".join(p.name for p, _ in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(f"{checkpoint_dir(run_dir)}: every checkpoint is unreadable ({names}; the newest: "
                              f"{str(bad[0][1]).removeprefix(str(bad[0][0]) + ': ')}); none was changed; to start "
                              "over from step 0, move them out of that folder, or train in a new --run-dir")
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
    atomic_save({"format": FORMAT, **state, "fid": record}, path, what="best-FID checkpoint")
    with written_atomically(summary, "best-FID summary") as f:
        f.write((json.dumps({**record, "checkpoint": path.name}, indent=1) + "\n").encode())
    return path


def read_best_fid(run_dir: Path) -> dict | None:
    """The "fid" record of checkpoints/best-fid.pt, or None when the run has none.  The file is
    memory-mapped, so its weights are not read."""
    path, _ = best_fid_paths(run_dir)
    if not path.is_file():
        return None
    try:
        blob = load_torch(path, mmap=True)
    except UnreadableFile as e:
        reason = f"not a soflow run checkpoint: {e}" if e.holds_objects else f"unreadable ({e})"
        raise CheckpointError(f"{path}: {reason}") from None
    record = blob.get("fid") if isinstance(blob, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("score"), float):
        raise CheckpointError(f"{path}: no FID record in it")
    return record


# safetensors dtype names (https://github.com/huggingface/safetensors, format section of its README)
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def export_safetensors(path: Path, state: dict, config: dict, step: int, sample_shape: Sequence[int],
                       num_classes: int) -> Path:
    """The tensors of `state` as a safetensors file with the run's config as metadata, written
    atomically (like checkpoints) and tensor by tensor, so no second copy of the weights is made."""
    metadata = {"config": json.dumps(config), "step": str(step), "format": FORMAT,
                "sample_shape": json.dumps(list(sample_shape)), "num_classes": str(num_classes)}
    with written_atomically(path, "export") as f:
        write_safetensors(f, state, metadata)
    return Path(path)


def write_safetensors(f: SupportsWrite[bytes], state: dict, metadata: dict) -> None:
    """The safetensors layout: an 8-byte little-endian header size, a JSON header (padded with
    spaces to a multiple of 8 bytes) giving each tensor's dtype, shape and byte range, then the
    tensors' bytes back to back.  Tensors go widest dtype first, then by name (safetensors' own
    order), so each one starts at a multiple of its element size and can be memory-mapped."""
    tensors = sorted(((k, v.detach()) for k, v in state.items()), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors:
        if t.dtype not in _DTYPES:
            raise CheckpointError(f"export: tensor {name} has dtype {t.dtype}, which soflow does not export")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for _, t in tensors:
        flat = t.cpu().contiguous().reshape(-1)
        f.write(memoryview(flat.view(torch.uint8).numpy()))


def stderr(msg: str) -> None:
    """Print one line on stderr at once."""
    print(msg, file=sys.stderr, flush=True)
