"""`soflow sample` at scale: every rank streams its batches to disk, rank 0 assembles the output.
Real `torchrun` processes (gloo, CPU) against one process, on a tiny 3x64x64 run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from helpers import soflow_inproc

RUNNER = """
import json, os, resource, sys
from soflow.cli import main
code = main(sys.argv[2:])
with open(os.path.join(sys.argv[1], "rank%s.json" % os.environ.get("RANK", "0")), "w") as f:
    json.dump(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, f)  # MiB (Linux reports KiB)
sys.exit(code)
"""


def torchrun(*args, script=None, timeout=300, **kw):
    """`torchrun --nproc-per-node=2` of `-m soflow ARGS`, or of `script ARGS`."""
    target = [str(script)] if script else ["-m", "soflow"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *target,
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


@pytest.fixture(scope="module")
def run64(tmp_path_factory):
    """A class-conditional 3x64x64 DiT trained one step on random images: big samples, cheap network."""
    root = tmp_path_factory.mktemp("run64")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "images" / c / f"{i}.png")
    sets = ["data.name=imagefolder", f"data.path={root / 'images'}", "data.resolution=64", "train.batch_size=4",
            "train.total_steps=1", "train.sample_num=2", "train.sample_nfe=[1]",
            "model.net_args={patch_size: 8, hidden_size: 32, depth: 1, num_heads: 2}"]
    soflow_inproc("train", "--config", "fmnist", "--run-dir", root / "run", *[a for s in sets for a in ("--set", s)],
                  check=True)
    return root / "run"


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def sample_on_two_ranks(run, folder, n, *args):
    """2-rank `soflow sample -n N ARGS --out folder/x.npz` through RUNNER: (output, peak RSS per rank in MiB)."""
    folder.mkdir()
    (folder / "runner.py").write_text(RUNNER)
    proc = torchrun(folder, "sample", "--checkpoint", run, "-n", n, "--batch-size", "128", "--device", "cpu", *args,
                    "--out", folder / "x.npz", script=folder / "runner.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / "x.npz", [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def small_run_two_ranks(run64, tmp_path_factory):
    """256 samples (ranks hold [0, 128) and [128, 256)): the memory baseline and an .npz to compare."""
    return sample_on_two_ranks(run64, tmp_path_factory.mktemp("two") / "256", 256, "--seed", "7", "--nfe", "2")


def test_two_ranks_write_the_same_bytes_as_one_process(run64, small_run_two_ranks, tmp_path):
    two_npz, _ = small_run_two_ranks
    soflow_inproc("sample", "--checkpoint", run64, "-n", "256", "--batch-size", "128", "--seed", "7", "--nfe", "2",
                  "--out", tmp_path / "one" / "x.npz", check=True)
    assert (tmp_path / "one" / "x.npz").read_bytes() == two_npz.read_bytes()
    one, two = tmp_path / "one" / "pngs", tmp_path / "two" / "pngs"
    args = ["--checkpoint", run64, "-n", "10", "--nfe", "2", "--seed", "7", "--batch-size", "4"]
    soflow_inproc("sample", *args, "--out", one, check=True)
    proc = torchrun("sample", *args, "--out", two)  # ranks hold samples [0, 4) and [4, 10)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert listing(tmp_path / "one") == ["pngs", "x.npz"] and listing(tmp_path / "two") == ["pngs"]  # no temporaries
    assert listing(two_npz.parent) == ["rank0.json", "rank1.json", "runner.py", "x.npz"]
    assert listing(one) == listing(two) == [f"{i:06d}.png" for i in range(10)]
    for name in listing(one):
        assert (one / name).read_bytes() == (two / name).read_bytes()

    # the samples of the Python API, in index order; the .npz is what numpy.savez writes (ADM: uint8 NHWC arr_0)
    from soflow import Pipeline
    from soflow.plots import to_uint8

    expect = to_uint8(Pipeline.from_pretrained(run64).sample(256, 2, seed=7, batch_size=128))  # SoFlow's default: chain
    np.savez(tmp_path / "expect.npz", arr_0=expect)
    assert two_npz.read_bytes() == (tmp_path / "expect.npz").read_bytes()
    assert np.array_equal(np.asarray(Image.open(two / "000009.png")), expect[9])


def test_peak_memory_per_rank_does_not_grow_with_num(run64, small_run_two_ranks, tmp_path):
    """6x the samples (float result 12 -> 72 MiB; gathering it used to cost about 4x that on every
    rank): a rank's peak memory stays at about one batch (a batch is 6 MiB)."""
    _, small = small_run_two_ranks
    out, large = sample_on_two_ranks(run64, tmp_path / "1536", 1536, "--seed", "7", "--nfe", "2")
    with np.load(out) as f:
        assert f["arr_0"].shape == (1536, 64, 64, 3)
    growth = [b - a for a, b in zip(small, large)]
    assert max(growth) < 64, f"peak RSS per rank grew by {growth} MiB for 1280 more samples"


def test_destinations_that_cannot_be_replaced_are_refused(tmp_path):
    """Checked before any sampling: old images would mix with new ones in a non-empty folder."""
    from soflow.writers import SampleOutput

    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "old.png").write_bytes(b"")
    (tmp_path / "x.npz").mkdir()
    for out, needle in (("pngs", "not empty"), ("x.npz", "is a folder")):
        with pytest.raises(ValueError, match=needle):
            SampleOutput(tmp_path / out, (3, 8, 8), 4, 2, 2, "t").check_destination()
    with pytest.raises(ValueError, match="needs image samples"):
        SampleOutput(tmp_path / "points", (2,), 4, 2, 2, "t")
    assert listing(tmp_path) == ["pngs", "x.npz"] and listing(tmp_path / "pngs") == ["old.png"]


def test_failures_and_sigterm_leave_no_files(run64, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # a bad class id fails on both ranks once the model is open (naming --class), and leaves nothing
    proc = torchrun("sample", "--checkpoint", run64, "-n", "6", "--batch-size", "2", "--class", "5",
                    "--out", out / "pngs")
    assert proc.returncode != 0 and "--class 5: the model's classes are 0 to 1" in proc.stderr
    assert listing(out) == []
    # stopped while the part files are being written: the parts go, no output appears
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "soflow",
           "sample", "--checkpoint", str(run64), "-n", "100000", "--batch-size", "64", "--out", str(out / "x.npz")]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and len([p for p in out.iterdir() if ".part" in p.name]) < 2:
        time.sleep(0.1)
    assert len([p for p in listing(out) if ".part" in p]) == 2, "both ranks should be writing their part files"
    job.send_signal(signal.SIGTERM)
    job.communicate(timeout=120)
    assert job.returncode != 0
    assert listing(out) == []
