"""`soflow fid`, `soflow eval` (in-process) and multi-process `soflow sample` (under torchrun)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import TINY, assert_one_line_error, soflow_inproc
from test_data import fake_fmnist, write_idx


def write_pngs(folder, n, lo, hi, seed):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        img = rng.integers(lo, hi, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder


def test_fid_cli_matches_torch_fidelity(tmp_path, random_inception_weights):
    torch_fidelity = pytest.importorskip("torch_fidelity")
    a, b = write_pngs(tmp_path / "a", 12, 0, 170, 1), write_pngs(tmp_path / "b", 12, 60, 255, 2)
    w = ["--inception-weights", random_inception_weights, "--dims", "64", "--device", "cpu"]
    soflow_inproc("fid", "ref", "--images", b, "--out", tmp_path / "ref.npz", *w, check=True)
    ref = np.load(tmp_path / "ref.npz")
    assert ref["mu"].shape == (64,) and ref["sigma"].dtype == np.float64
    soflow_inproc("fid", "calc", "--images", a, "--ref", tmp_path / "ref.npz", "--json", tmp_path / "fid.json", *w,
                  check=True)
    result = json.loads((tmp_path / "fid.json").read_text())
    theirs = torch_fidelity.calculate_metrics(
        input1=str(a), input2=str(b), fid=True, feature_layer_fid="64", cuda=False, cache=False, verbose=False,
        feature_extractor_weights_path=str(random_inception_weights))[torch_fidelity.KEY_METRIC_FID]
    assert result["num_images"] == 12
    assert result["fid"] == pytest.approx(theirs, rel=1e-3)
    same = soflow_inproc("fid", "calc", "--images", b, "--ref", tmp_path / "ref.npz", *w, check=True)
    assert abs(json.loads(same.stdout)["fid"]) < 1e-6


def test_fid_cli_missing_weights_is_one_line(tmp_path):
    write_pngs(tmp_path / "a", 2, 0, 255, 1)
    proc = soflow_inproc("fid", "ref", "--images", tmp_path / "a", "--out", tmp_path / "r.npz",
                  "--inception-weights", tmp_path / "nope.pth")
    assert_one_line_error(proc, "nope.pth", "Inception weights not found")


def test_eval_points_cli(tmp_path):
    run = tmp_path / "run"
    soflow_inproc("train", "--config", "toy2d", "--run-dir", run, *TINY, "--set", "train.total_steps=5", check=True)
    proc = soflow_inproc("eval", "points", "--checkpoint", run, "--nfe", "2", "--num", "300", check=True)
    result = json.loads(proc.stdout)
    assert result["nfe"] == 2 and result["num"] == 300 and result["step"] == 5
    # the same 300 samples drawn by `soflow sample` (seed 0), scored here against the run's data
    soflow_inproc("sample", "--checkpoint", run, "--nfe", "2", "--num", "300", "--out", tmp_path / "x.npy", check=True)
    from soflow.data import make_dataset
    from soflow.eval.points import energy_distance, sliced_wasserstein2
    from soflow.run.load import load_run

    x = np.load(tmp_path / "x.npy")
    ref = make_dataset(load_run(run)[0].data).reference(300)
    assert x.shape == (300, 2) and x.dtype == np.float32
    assert result["energy_distance"] == pytest.approx(energy_distance(x, ref), rel=1e-5)
    assert result["sliced_w2"] == pytest.approx(sliced_wasserstein2(x, ref), rel=1e-5)
    assert 0 < result["energy_distance"] and 0 < result["sliced_w2"]


def test_eval_fmnist_cli(tmp_path):
    data = fake_fmnist(tmp_path / "fm", n=40)
    rng = np.random.default_rng(5)
    write_idx(data / "t10k-images-idx3-ubyte.gz", 2051, rng.integers(0, 256, (30, 28, 28)))
    write_idx(data / "t10k-labels-idx1-ubyte.gz", 2049, np.arange(30) % 10)
    run = tmp_path / "run"
    soflow_inproc("train", "--config", "fmnist", "--run-dir", run, "--set", f"data.path={data}",
                  "--set", "train.batch_size=8", "--set", "train.total_steps=2", "--set", "train.sample_nfe=[1]",
                  "--set", "model.net_args={patch_size: 7, hidden_size: 32, depth: 1, num_heads: 2}", check=True)
    proc = soflow_inproc("eval", "fmnist", "--checkpoint", run, "--nfe", "1", "--per-class", "3", check=True)
    result = json.loads(proc.stdout)
    assert result["num"] == 30 and 0 <= result["class_accuracy"] <= 1 and result["classifier_fd"] > 0
    # The fmnist preset has guidance 2 built in: it is the default, and another scale is one line.
    assert result["guidance"] == 2.0
    own = json.loads(soflow_inproc("eval", "fmnist", "--checkpoint", run, "--nfe", "1", "--per-class", "3",
                                   "--guidance", "2", check=True).stdout)
    assert own == result
    proc = soflow_inproc("eval", "fmnist", "--checkpoint", run, "--nfe", "1", "--per-class", "3", "--guidance", "3")
    assert_one_line_error(proc, "guidance 3.0", "built in by training")


def test_sampling_over_two_ranks_equals_one_process(tmp_path):
    run = tmp_path / "run"
    soflow_inproc("train", "--config", "toy2d", "--run-dir", run, *TINY, "--set", "train.total_steps=3", check=True)
    soflow_inproc("sample", "--checkpoint", run, "--num", "11", "--nfe", "2", "--out", tmp_path / "one.npy", check=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                           "soflow", "sample", "--checkpoint", str(run), "-n", "11", "--nfe", "2",
                           "--out", str(tmp_path / "two.npy")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.allclose(np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy"), atol=1e-6)


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="dataset-fashion-mnist not installed")
def test_shipped_fmnist_classifier_accuracy():
    import torch

    from soflow.data.images import fashion_mnist, to_float
    from soflow.eval.fmnist import features_and_predictions, load_classifier

    torch.set_num_threads(2)
    test = fashion_mnist(split="test")
    _, pred = features_and_predictions(load_classifier(), to_float(test.images))
    accuracy = (pred == test.labels).float().mean().item()
    print(f"Fashion-MNIST classifier test accuracy {accuracy:.4f}")
    assert accuracy >= 0.92
