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
