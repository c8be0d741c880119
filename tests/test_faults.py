"""Real faults against a real trainer: kill -9 at random moments, a disk that fills mid-write."""

import os
import random
import signal
import subprocess
import sys
import time

import torch

from helpers import TINY, assert_one_line_error, on_full_disk, soflow
from soflow.run.checkpoint import list_checkpoints, read_checkpoint

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


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--config", "toy2d", "--run-dir", str(run), *TINY, "--set", "train.total_steps=20",
            "--set", "train.checkpoint_every=10"]
    writer = on_full_disk(r"^\.ckpt-.*\.tmp$", *args, fits=1)  # the first checkpoint fits, the second does not
    out, err = writer.communicate(timeout=300)
    proc = subprocess.CompletedProcess(writer.args, writer.returncode, out, err)
    assert_one_line_error(proc, "No space left on device", "ckpt-00000020", "step 10")
    assert [s for s, _ in list_checkpoints(run)] == [10]
    assert read_checkpoint(list_checkpoints(run)[0][1])["step"] == 10  # intact
    assert not list((run / "checkpoints").glob(".*.tmp"))
    resumed = soflow("train", "--run-dir", run, check=True)
    assert "resumed from" in resumed.stdout and [s for s, _ in list_checkpoints(run)][0] == 20
