"""Running the real `soflow` command line: in a subprocess (`soflow`), or in this process
(`soflow_inproc`) where nothing about the process itself is under test."""

import contextlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import traceback
import warnings
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


def _print_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def soflow_inproc(*args, check=False, env=None) -> subprocess.CompletedProcess:
    """`soflow ARGS` through `soflow.cli.main` in this process, without the 2-4 s of a fresh torch import.

    Returns what `soflow` returns (returncode, stdout, stderr).  The environment (OMP_NUM_THREADS=1 and
    `env`), the intra-op thread count, the random states, warning filters and signal handlers are set
    as a fresh process would have them and restored afterwards, so that tests stay independent.  Use
    `soflow` for anything about the process itself: signals, locks, kills, start-up, torchrun."""
    import numpy as np
    import torch

    from soflow.cli import main

    argv = [str(a) for a in args]
    new_env = {"OMP_NUM_THREADS": "1", **(env or {})}
    old_env = {k: os.environ.get(k) for k in new_env}
    threads = torch.get_num_threads()
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update(new_env)
        torch.set_num_threads(1)
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            # Python's default filters, printed on (the redirected) stderr, as in a fresh process
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = _print_warning  # not pytest's recorder
            try:
                code = main(argv)
            except SystemExit as e:  # argparse: --help, --version, usage errors
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
            except Exception:  # noqa: BLE001  a fault: its traceback and status 1, as from `python -m soflow`
                traceback.print_exc()
                code = 1
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        torch.set_num_threads(threads)
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        for s, h in handlers.items():
            if signal.getsignal(s) is not h:
                signal.signal(s, h)
    proc = subprocess.CompletedProcess(["soflow", *argv], code or 0, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"soflow {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
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
