"""One trainer per run folder: a live trainer refuses a second one, a killed one's lock is taken over."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import TINY, assert_one_line_error, soflow, soflow_inproc
from soflow import Pipeline
from soflow.run.config import ConfigError
from soflow.train.lock import RunLock

HOLD = """
import sys, time
from soflow.train.lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(run):
    """A real process holding the lock of `run` until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(ConfigError, match=rf"another trainer.*pid {proc.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path):
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    warnings = []
    lock = RunLock(tmp_path, warn=warnings.append).acquire()
    try:
        assert len(warnings) == 1 and f"pid {proc.pid}" in warnings[0] and "gone" in warnings[0]
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert (tmp_path / ".lock").read_text() == ""  # released: the next trainer takes it silently
    with RunLock(tmp_path, warn=warnings.append):
        assert len(warnings) == 1


def test_cli_refuses_a_second_trainer_on_a_live_run(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "soflow", "train", "--config", "toy2d", "--run-dir", str(run), *TINY,
                              "--set", "train.total_steps=100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (run / ".lock").is_file() or not (run / ".lock").read_text():
            assert time.time() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.2)
        second = soflow_inproc("train", "--config", "toy2d", "--run-dir", run, *TINY, "--set", "train.total_steps=10")
        assert_one_line_error(second, "another trainer", f"pid {first.pid}")
        assert first.poll() is None  # the first trainer goes on
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 0
    # The refused trainer wrote nothing: every checkpoint and log line is the first trainer's.
    assert "another trainer" not in (run / "log.txt").read_text()


def test_sample_needs_no_lock(tmp_path):
    run = tmp_path / "run"
    soflow_inproc("train", "--config", "toy2d", "--run-dir", run, *TINY, "--set", "train.total_steps=5", check=True)
    with RunLock(run):
        soflow("sample", "--checkpoint", run, "--num", "16", "--out", tmp_path / "x.npy", check=True)
    # the file holds the run's samples, as its pipeline draws them (--nfe 1 and --seed 0 by default)
    written = torch.from_numpy(np.load(tmp_path / "x.npy"))
    assert written.shape == (16, 2) and bool(written.isfinite().all())
    assert torch.equal(written, Pipeline.from_pretrained(run).sample(16, 1, seed=0))


def test_lock_written_on_another_host_is_taken_with_a_warning_that_says_what_it_means(tmp_path):
    """A shared folder whose file system keeps flock per host (Lustre localflock, BeeGFS without
    global locks) cannot show a live holder on another host: the record names it, and the warning
    says what to do (the real cross-host case needs two machines)."""
    (tmp_path / ".lock").write_text(json.dumps({"host": "other-node-07", "pid": 4242, "started": "2025-01-01 00:00:00"}))
    warnings = []
    lock = RunLock(tmp_path, warn=warnings.append).acquire()
    lock.release()
    assert len(warnings) == 1 and "last written on another host (pid 4242 on other-node-07" in warnings[0]
    assert "does not share locks between hosts" in warnings[0]
