"""Running the real `soflow` command line in subprocesses."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

# Small and fast: a tiny MLP on the checkerboard, single-threaded.
TINY = ["--set", "model.net_args={hidden: 32, depth: 1}", "--set", "train.batch_size=64",
        "--set", "train.log_every=5", "--set", "train.sample_num=200", "--set", "train.sample_nfe=[1]"]


def soflow(*args, timeout=300, check=False, env=None, unprivileged=False, **kw) -> subprocess.CompletedProcess:
    """Run `python -m soflow ARGS`.  unprivileged=True makes file permissions apply even under root,
    by dropping the capabilities that override them (so read-only folders can be tested in CI)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    prefix = []
    if unprivileged and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: read-only folders cannot be shown")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    proc = subprocess.run([*prefix, sys.executable, "-m", "soflow", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"soflow {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


# `python -m soflow` on a disk that fills up: files written whose name matches $FULL take 4096 bytes,
# then fail with ENOSPC, except the first $FULL_FITS of them, which fit.  (The one simulated fault:
# every other fault in the suite is real.)
FULL_DISK_RUNNER = """
import builtins, errno, os, re, sys
real_open, full = builtins.open, re.compile(os.environ["FULL"])
fits = [int(os.environ.get("FULL_FITS", "0"))]

class Full:
    def __init__(self, f):
        self.f, self.left = f, 4096
        if fits[0] > 0:
            fits[0] -= 1
            self.left = float("inf")
    def write(self, b):
        if len(b) > self.left:
            self.f.write(bytes(b)[:int(self.left)]); self.left = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(b)
        return self.f.write(b)
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *a):
        return self.f.__exit__(*a)

def fake_open(file, mode="r", *a, **k):
    f = real_open(file, mode, *a, **k)
    return Full(f) if "w" in str(mode) and full.search(os.path.basename(str(file))) else f

builtins.open = fake_open
from soflow.cli import main
sys.exit(main(sys.argv[1:]))
"""


def on_full_disk(pattern: str, *args, fits: int = 0) -> subprocess.Popen:
    """Start `python -m soflow ARGS` with writes to files matching `pattern` failing (see above)."""
    return subprocess.Popen([sys.executable, "-c", FULL_DISK_RUNNER, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "FULL": pattern, "FULL_FITS": str(fits)})
