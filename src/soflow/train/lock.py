"""One trainer per run folder: an advisory lock on `RUN/.lock`, held by the training process.

The kernel drops an `flock` when its holder exits, however it exits (kill -9 included), so a lock
left behind by a dead trainer never blocks the next one. The file also records who holds it
(host, pid, start time), so a refused second trainer can name the holder, and a trainer that takes
over a lock whose recorded holder is gone says so.

On a folder shared by several hosts the lock is as good as the file system's `flock`: NFSv4 (and
NFSv3 with lockd), GPFS and Lustre mounted with `-o flock` share it between hosts, so a trainer
on another host is refused like one on this host. Lustre's `localflock` and BeeGFS without global
file locks keep it per host; there, a takeover of a record written on another host is reported as
possibly a live trainer, since from here it cannot be told apart from a dead one. A file system
without `flock` at all (Lustre `noflock`) runs the trainer unlocked, with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

from ..errors import ConfigError

LOCK_NAME = ".lock"


class RunLock:
    """`with RunLock(run_dir, warn):` holds the run folder for the block (or call acquire/release)."""

    flag, holder = "--run-dir", "trainer"  # the option that names the place, and who holds it

    def __init__(self, run_dir: str | Path, warn: Callable[[str], None] = print):
        self.path = Path(run_dir) / LOCK_NAME
        self.warn = warn
        self._fd: int | None = None

    def busy(self, holder: str) -> str:
        return (f"{self.path.parent}: another trainer is using this run folder ({holder}); wait for it to finish, "
                "stop it, or choose another --run-dir")

    def acquire(self) -> "RunLock":
        while True:
            fd, created = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read(fd))
                os.close(fd)
                raise ConfigError(self.busy(holder)) from None
            except OSError as e:
                if e.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
                    os.close(fd)
                    raise
                self.warn(f"warning: {self.path}: this file system does not lock files ({e.strerror}); "
                          f"a second {self.holder} on {self.path.parent} will not be refused")
                break
            if _same_file(fd, self.path):
                break
            os.close(fd)  # removed by its last holder after we opened it: open the new one
        previous = _read(fd)
        if previous.get("host", socket.gethostname()) != socket.gethostname():
            self.warn(f"warning: the lock of {self.path.parent} was last written on another host "
                      f"({_describe(previous)}); if that {self.holder} still runs, this file system does not share "
                      "locks between hosts: stop one")
        elif previous:  # written by a process that exited without releasing (killed): its lock went with it
            self.warn(f"warning: taking over the lock of a {self.holder} that is gone ({_describe(previous)})")
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            os.fsync(fd)
        except OSError as e:  # a full disk (or quota) at start: nothing of this process stays behind
            if created:
                self.path.unlink(missing_ok=True)
            os.close(fd)
            raise ConfigError(f"{self.flag} {self.path.parent}: cannot write there ({e.strerror}); free some space "
                              "and run again") from None
        self._fd = fd
        return self

    def _open(self) -> tuple[int, bool]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), created
        except OSError as e:  # the folder is a file, or not writable: say so before any work starts
            raise ConfigError(f"{self.flag} {self.path.parent}: cannot write there ({e.strerror})") from None

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty file means nobody holds the folder
        with contextlib.suppress(OSError):  # unlocked on a file system without flock
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class OutputLock(RunLock):
    """`with OutputLock(out):` one `soflow sample` at a time writes `out`; the lock file
    (`.NAME.lock` next to it) is removed when the writer is done."""

    flag, holder = "--out", "soflow sample"

    def __init__(self, out: str | Path, warn: Callable[[str], None] = print):
        super().__init__(Path(out).parent, warn)
        self.out = Path(out)
        self.path = self.out.with_name(f".{self.out.name}.lock")

    def busy(self, holder: str) -> str:
        return (f"--out {self.out}: another soflow sample is writing it ({holder}); wait for it to finish, or "
                "choose another --out")

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while held: a process that opened it sees another file and retries
        super().release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _read(fd: int) -> dict:
    raw = os.pread(fd, 4096, 0)
    try:
        record = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {"unreadable": True}
    return record if isinstance(record, dict) else {"unreadable": True}


def _describe(record: dict) -> str:
    if not record or record.get("unreadable"):
        return "holder unknown"
    return f"pid {record.get('pid')} on {record.get('host')}, since {record.get('started')}"
