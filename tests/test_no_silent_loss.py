"""The last tracebacks and silent losses: a disk full at start, names too long, negative seeds,
two samplers on one output, a run whose checkpoints are all unreadable, an optimizer changed on
resume, a setting silently taken back, absurd sample counts, and a reference precision/recall
could never use.  Full disks are real (a small tmpfs) where the test runs as root."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY, assert_one_line_error, soflow_inproc
from soflow.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("loss") / "run"
    soflow_inproc("train", "--config", "toy2d", "--run-dir", run, *TINY, "--set", "train.total_steps=20",
                  "--set", "train.lr=0.0005", "--set", "train.checkpoint_every=10", "--stop-after", "10", check=True)
    return run


def one_line(capsys, argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def full_disk(tmp_path):
    """A real file system of 1 MB, filled to the last block."""
    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a real full disk needs a tmpfs mount (root)")
    try:
        with open(mount / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_at_start_is_one_line_and_leaves_no_lock(full_disk, capsys):
    err = one_line(capsys, ["train", "--config", "toy2d", "--run-dir", full_disk / "run", *TINY])
    assert "No space left on device" in err and "--run-dir" in err
    assert not (full_disk / "run" / ".lock").exists()


def test_samples_larger_than_the_free_space_are_refused_before_sampling(full_disk, run, capsys):
    os.truncate(full_disk / "filler", 600_000)  # 400 kB left: 100,000 2-D points take 800 kB as .npy, twice while assembled
    err = one_line(capsys, ["sample", "--checkpoint", run, "--num", "100000", "--out", full_disk / "x.npy"])
    assert "free" in err and "lower --num" in err
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_absurd_counts_are_refused(run, tmp_path, capsys):
    out = tmp_path / "x.npy"
    assert "--nfe 1000000000000000000000: at most" in one_line(
        capsys, ["sample", "--checkpoint", run, "--nfe", str(10 ** 21), "--out", out])
    assert "lower --num" in one_line(capsys, ["sample", "--checkpoint", run, "--num", str(10 ** 12), "--out", out])
    assert "a .png figure holds at most" in one_line(
        capsys, ["sample", "--checkpoint", run, "--num", str(10 ** 9), "--out", tmp_path / "x.png"])
    assert not out.exists() and not (tmp_path / "x.png").exists()


def test_names_too_long_and_negative_seeds_are_one_line(run, tmp_path, capsys):
    err = one_line(capsys, ["train", "--config", "toy2d", "--run-dir", tmp_path / ("r" * 300), *TINY])
    assert "--run-dir" in err and "300 characters long" in err
    err = one_line(capsys, ["sample", "--checkpoint", run, "--out", tmp_path / ("o" * 240 + ".npy")])
    assert "--out" in err and "characters long" in err
    err = one_line(capsys, ["sample", "--checkpoint", tmp_path / ("c" * 300), "--out", tmp_path / "x.npy"])
    assert "File name too long" in err
    assert "--seed must be 0 or more, got -1" in one_line(
        capsys, ["sample", "--checkpoint", run, "--seed", "-1", "--out", tmp_path / "x.npy"])
    assert "--seed must be 0 or more" in one_line(capsys, ["eval", "points", "--checkpoint", run, "--seed", "-1"])
    assert list(tmp_path.iterdir()) == []


def test_two_samplers_on_one_output_and_sigterm_say_what_was_kept(run, tmp_path):
    out = tmp_path / "x.npy"
    np.save(out, np.zeros(3))
    old = out.read_bytes()
    first = subprocess.Popen([sys.executable, "-m", "soflow", "sample", "--checkpoint", str(run), "-n", "3000000",
                              "--batch-size", "64", "--out", str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(".part" in p.name for p in tmp_path.iterdir()):
            time.sleep(0.1)
        second = soflow_inproc("sample", "--checkpoint", run, "-n", "10", "--out", out)
        assert_one_line_error(second, f"--out {out}: another soflow sample is writing it (pid {first.pid}")
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 128 + signal.SIGTERM
    assert f"stopped by signal {signal.SIGTERM}; nothing was written to {out}" in err and "kept" in err
    assert out.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_every_checkpoint_unreadable_is_refused_not_restarted(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpts = sorted((copy / "checkpoints").glob("ckpt-*.pt"))
    for p in ckpts:
        p.write_bytes(p.read_bytes()[:100])
    err = one_line(capsys, ["train", "--config", "toy2d", "--run-dir", copy, *TINY, "--set", "train.total_steps=20"])
    assert "every checkpoint is unreadable" in err and ckpts[0].name in err and "start over" in err
    assert sorted((copy / "checkpoints").glob("ckpt-*.pt")) == ckpts  # none renamed, none replaced


def test_resume_says_what_it_changes(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    # the preset's lr comes back when the earlier --set is left out: the console says so
    proc = soflow_inproc("train", "--config", "toy2d", "--run-dir", copy, *TINY, "--set", "train.total_steps=20",
                         "--set", "train.optimizer=radam", "--stop-after", "2", check=True)
    assert "train.lr 0.0005 -> 0.002" in proc.stderr
    assert "train.optimizer is radam here but adamw in the checkpoint: radam starts with a fresh state" in proc.stderr


def test_a_reference_too_small_for_precision_recall_is_refused(tmp_path, capsys, random_inception_weights):
    images = tmp_path / "three.npz"
    np.savez(images, arr_0=np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
    err = one_line(capsys, ["fid", "ref", "--images", images, "--out", tmp_path / "ref.npz", "--prc",
                            "--inception-weights", random_inception_weights, "--device", "cpu", "--dims", "64"])
    assert "at least 4 images, not 3" in err
    assert not (tmp_path / "ref.npz").exists()


def test_a_tiny_checkpoint_is_not_called_a_pickle(tmp_path, capsys):
    for size in (0, 1, 7):
        ckpt = tmp_path / f"ckpt-{size}.pt"
        ckpt.write_bytes(b"x" * size)
        err = one_line(capsys, ["sample", "--checkpoint", ckpt, "--out", tmp_path / "x.npy"])
        assert f"empty or truncated file ({size} byte" in err and "pickle" not in err
    (tmp_path / "text.pt").write_text("hello, this is not a checkpoint at all")
    err = one_line(capsys, ["sample", "--checkpoint", tmp_path / "text.pt", "--out", tmp_path / "x.npy"])
    assert "not a torch file" in err and "pickle header" in err
    assert not any(Path(p).suffix == ".npy" for p in os.listdir(tmp_path))
