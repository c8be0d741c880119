"""The files a run folder holds, and whether they can be written (checked before any work)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError

RUN_FOLDERS = ("checkpoints", "exports", "samples")  # created by training when first needed
RUN_FILES = ("config.yaml", "log.txt", "metrics.jsonl")  # rewritten or appended to at every start


def unwritable(folder: str | Path) -> str | None:
    """Why files cannot be created in `folder` (when it does not exist yet: in the nearest existing
    folder above it, where it would be created), or None when they can.  Checked up front so that a
    command fails before its work rather than when it first saves."""
    long = too_long(folder)
    if long:
        return long
    probe = Path(folder)
    while not (probe.exists() or probe.is_symlink()) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is {'a file, not a folder' if probe.is_file() else 'not a folder'}"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


NAME_MAX = 255  # the longest file name of common file systems (ext4, xfs, tmpfs, btrfs)


def too_long(path: str | Path, extra: int = 0) -> str | None:
    """Why `path` cannot be created because a name in it (the last one `extra` characters longer,
    for the temporary names made from it) is too long, or None."""
    parts = Path(path).parts
    for i, name in enumerate(parts):
        size = len(os.fsencode(name)) + (extra if i == len(parts) - 1 else 0)
        if size > NAME_MAX:
            return (f"the name {name[:24]}... is {len(name)} characters long; file names hold at most "
                    f"{NAME_MAX - (extra if i == len(parts) - 1 else 0)} here")
    return None


def check_run_dir(run_dir: str | Path) -> None:
    """Refuse, before any training step, a run folder whose checkpoints, exports, samples or logs
    could not be written (a read-only folder, or a file where a folder belongs)."""
    run_dir = Path(run_dir)
    problem = unwritable(run_dir)
    for name in RUN_FOLDERS:
        sub = run_dir / name
        if problem is None and (sub.exists() or sub.is_symlink()):
            problem = unwritable(sub)
    for name in RUN_FILES:
        file = run_dir / name
        if problem is None and file.is_dir():
            problem = f"{file} is a folder, not a file"
        elif problem is None and file.exists() and not os.access(file, os.W_OK):
            problem = f"{file} is not writable"
    if problem:
        raise ConfigError(f"--run-dir {run_dir}: cannot write the run there: {problem}")
