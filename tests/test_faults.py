"""Real faults against a real trainer: kill -9 at random moments, a disk that fills mid-write."""

import os
import random
import signal
import subprocess
import sys
import time

import torch

from helpers import TINY, assert_one_line_error, soflow
from soflow.train.checkpoint import list_checkpoints, read_checkpoint

STEPS = ["--set", "train.total_steps=300", "--set", "train.checkpoint_every=1", "--set", "train.keep_last=2",
         "--set", "train.log_every=50"]


def _args(run):
    return [sys.executable, "-m", "soflow", "train", "--config", "toy2d", "--run-dir", str(run), *TINY, *STEPS]


def _newest_step(run):
    found = list_checkpoints(run)
    return found[0][0] if found else -1


def test_kill_9_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # The uninterrupted run goes alongside the killed ones (a core each), not before them, to keep the test short.
    errors = open(tmp_path / "straight.err", "w+")
    uninterrupted = subprocess.Popen(_args(straight), stdout=subprocess.DEVNULL, stderr=errors, env=env)
    rng = random.Random(0)
    kills = 0
    while kills < 4:
        before = _newest_step(killed)
        proc = subprocess.Popen(_args(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 120
        while _newest_step(killed) <= before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere in the steps, checkpoint writes included
        if proc.poll() is not None:
            break  # finished before the kill: the run is complete
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 2, "the run finished before it could be killed twice; make it longer"
    subprocess.run(_args(killed), check=True, capture_output=True, env=env, timeout=300)
    assert uninterrupted.wait(timeout=300) == 0, (tmp_path / "straight.err").read_text()
    errors.close()

    (s1, p1), (s2, p2) = list_checkpoints(straight)[0], list_checkpoints(killed)[0]
    assert s1 == s2 == 300
    a, b = read_checkpoint(p1), read_checkpoint(p2)
    for key in ("net", "ema"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key}/{name} differs after {kills} kills"
    assert not list((killed / "checkpoints").glob(".*.tmp")), "temporary files of killed writers were left behind"


ENOSPC_RUNNER = """
import builtins, errno, sys
real_open = builtins.open
writes = {"checkpoints": 0}

class Full:
    # A file on a disk that fills up: the first checkpoint fits, the second fails part-way.
    def __init__(self, f):
        self.f, self.left = f, None
    def write(self, b):
        if self.left is None:
            writes["checkpoints"] += 1
            self.left = 10**9 if writes["checkpoints"] == 1 else 4096
        if len(b) > self.left:
            self.f.write(bytes(b)[:self.left]); self.left = 0
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
    return Full(f) if str(file).endswith(".tmp") and "ckpt-" in str(file) else f

builtins.open = fake_open
from soflow.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--config", "toy2d", "--run-dir", str(run), *TINY, "--set", "train.total_steps=20",
            "--set", "train.checkpoint_every=10"]
    proc = subprocess.run([sys.executable, "-c", ENOSPC_RUNNER, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_one_line_error(proc, "No space left on device", "ckpt-00000020", "step 10")
    assert [s for s, _ in list_checkpoints(run)] == [10]
    assert read_checkpoint(list_checkpoints(run)[0][1])["step"] == 10  # intact
    assert not list((run / "checkpoints").glob(".*.tmp"))
    resumed = soflow("train", "--run-dir", run, check=True)
    assert "resumed from" in resumed.stdout and [s for s, _ in list_checkpoints(run)][0] == 20
