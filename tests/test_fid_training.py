"""FID while training (train.fid_every): scores in metrics.jsonl, checkpoints/best-fid.pt and its
score across a resume, start-up errors, chunked statistics, and one rank against two.

The Inception weights are random (the `random_inception_weights` fixture) and the runs score the
64-channel early layer (train.fid_dims=64): the matrix square root of 2048-feature statistics takes
about 20 s on one core, the code path is otherwise the same."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import randomize
from helpers import assert_one_line_error, soflow_inproc
from test_data import fake_fmnist, tiny_vae

pytest.importorskip("torch_fidelity")

UNCONDITIONAL = ["--set", "data.conditional=false", "--set", "objective.cfg_scale=1", "--set", "objective.mix_ratio=1",
                 "--set", "objective.cfg_drop_rate=0"]


@pytest.fixture(scope="module")
def fid_files(tmp_path_factory, random_inception_weights):
    """(Fashion-MNIST-like data folder, 64-feature reference statistics of 8 of its images, weights)."""
    from soflow.data.images import fashion_mnist
    from soflow.eval.run import fid_reference

    folder = tmp_path_factory.mktemp("fid-training")
    data = fake_fmnist(folder / "fm", n=64)
    np.savez(folder / "real.npz", arr_0=fashion_mnist(str(data)).images[:8].permute(0, 2, 3, 1).numpy())
    ref, _ = fid_reference(str(folder / "real.npz"), folder / "ref.npz", random_inception_weights, "cpu", dims="64")
    return data, ref, random_inception_weights


def train_args(run, files, *extra):
    data, ref, weights = files
    return ["train", "--config", "fmnist", "--run-dir", run, "--set", f"data.path={data}", "--set", "train.batch_size=8",
            "--set", "train.sample_nfe=[1]", "--set", "model.net_args={patch_size: 7, hidden_size: 32, depth: 1, num_heads: 2}",
            "--set", "train.lr=0.01", "--set", "train.log_every=2", "--set", "train.checkpoint_every=2",
            "--set", "train.fid_num=8", "--set", "train.fid_dims=64", "--set", "train.fid_batch_size=3",
            "--set", f"train.fid_ref={ref}", "--set", f"train.fid_inception={weights}", *extra]


def fid_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if any(k.startswith("fid_nfe") for k in r)]


def test_scores_logged_best_checkpoint_kept_and_its_score_survives_resume(tmp_path, fid_files):
    run = tmp_path / "run"
    soflow_inproc(*train_args(run, fid_files, *UNCONDITIONAL, "--set", "train.total_steps=5",
                              "--set", "train.fid_every=2"), check=True)
    records = fid_records(run)
    assert [r["step"] for r in records] == [2, 4, 5]  # every 2 steps and at the last one
    assert all(np.isfinite(r["fid_nfe1"]) and np.isfinite(r["fid_nfe2"]) for r in records)
    best = json.loads((run / "checkpoints" / "best-fid.json").read_text())
    first = min(records, key=lambda r: r["fid_nfe1"])
    assert (best["step"], best["metric"], best["score"]) == (first["step"], "fid_nfe1", first["fid_nfe1"])

    # best-fid.pt is a checkpoint `soflow sample` reads; its EMA samples score the logged FID as `soflow fid calc` does
    from soflow.eval.run import fid_against_reference

    _, ref, weights = fid_files
    soflow_inproc("sample", "--checkpoint", run / "checkpoints" / "best-fid.pt", "-n", "8", "--nfe", "1", "--seed", "0",
                  "--out", tmp_path / "best.npz", check=True)
    scored = fid_against_reference(str(tmp_path / "best.npz"), ref, weights, "cpu", dims="64")
    assert scored["fid"] == pytest.approx(best["score"], rel=1e-6)

    # scoring does not touch the training random streams: the same weights as a run without FID
    plain = tmp_path / "plain"
    soflow_inproc(*train_args(plain, fid_files, *UNCONDITIONAL, "--set", "train.total_steps=5"), check=True)
    with_fid, without = (torch.load(r / "checkpoints" / "ckpt-00000005.pt", weights_only=True) for r in (run, plain))
    for key in ("net", "ema"):
        assert all(torch.equal(with_fid[key][k], without[key][k]) for k in without[key])

    # resume reads the best score back: an unbeatable stored score keeps best-fid.pt from being replaced
    path = run / "checkpoints" / "best-fid.pt"
    blob = torch.load(path, weights_only=True)
    blob["fid"]["score"] = -1.0
    torch.save(blob, path)
    resumed = soflow_inproc(*train_args(run, fid_files, *UNCONDITIONAL, "--set", "train.total_steps=6", "--set",
                                        "train.fid_every=2", "--set", "train.fid_nfe=[1]"), check=True)
    assert f"best FID so far: fid_nfe1 -1.0000 at step {best['step']}" in resumed.stdout
    assert [r["step"] for r in fid_records(run)] == [2, 4, 5, 6]
    assert json.loads((run / "checkpoints" / "best-fid.json").read_text())["step"] == best["step"]
    assert torch.load(path, weights_only=True)["fid"]["score"] == -1.0


@pytest.mark.parametrize("key, value, needle", [("train.fid_ref", "missing.npz", "train.fid_ref: "),
                                                ("train.fid_inception", "missing.pth", "Inception weights not found")])
def test_missing_reference_or_weights_stop_before_the_first_step(tmp_path, fid_files, key, value, needle):
    run = tmp_path / "run"
    proc = soflow_inproc(*train_args(run, fid_files, *UNCONDITIONAL, "--set", "train.total_steps=2", "--set",
                                     "train.fid_every=2", "--set", f"{key}={tmp_path / value}"))
    assert proc.returncode == 2
    assert_one_line_error(proc, needle, str(tmp_path / value), key)
    assert not (run / "checkpoints").exists()


def latent_data(tmp_path: Path) -> Path:
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(3)
    path = tmp_path / "imagenet_latent.hdf5"
    with h5py.File(path, "w") as f:
        f["latents"] = np.concatenate([rng.normal(size=(12, 4, 8, 8)), np.full((12, 4, 8, 8), 0.1)], 1).astype(np.float32)
        f["labels"] = rng.integers(0, 1000, 12)
        f["amount"] = 12
        f["latent_size"] = 8
    return path


def open_fid(cfg, run_dir):
    from soflow.data import make_dataset
    from soflow.train.training_fid import TrainingFID
    from soflow import distributed
    from soflow.train.runlog import RunLog

    return TrainingFID(cfg, make_dataset(cfg.data), distributed.setup("cpu"), run_dir, RunLog(run_dir, enabled=False))


def test_settings_checked_at_start_up(tmp_path, fid_files):
    from soflow.errors import EvalError
    from soflow.eval.fid import save_stats
    from soflow.run.config import ConfigError, load

    _, ref, weights = fid_files
    for bad, needle in [("train.fid_num=1", "train.fid_num"), ("train.fid_dims=100", "train.fid_dims"),
                        ("train.fid_nfe=[1, 1]", "train.fid_nfe"), ("train.fid_ref=null", "train.fid_ref")]:
        with pytest.raises(ConfigError, match=needle):
            load("fmnist", ["train.fid_every=5", f"train.fid_ref={ref}", bad])
    with pytest.raises(ConfigError, match="FID needs image data"):
        load("toy2d", ["train.fid_every=5", f"train.fid_ref={ref}"])
    base = ["model.net=dit-tiny", f"data.path={latent_data(tmp_path)}", "train.fid_every=5", f"train.fid_ref={ref}",
            f"train.fid_inception={weights}", "train.fid_dims=64"]
    with pytest.raises(EvalError, match="data.vae: FID of latent samples decodes them"):
        open_fid(load("imagenet-dit-b4", base), tmp_path / "run")
    save_stats(tmp_path / "wide.npz", np.zeros(2048), np.eye(2048))
    with pytest.raises(EvalError, match="holds statistics of 2048 features, train.fid_dims is 64"):
        open_fid(load("imagenet-dit-b4", [*base, f"train.fid_ref={tmp_path / 'wide.npz'}"]), tmp_path / "run")


def test_chunked_statistics_of_decoded_latents_equal_one_batch(tmp_path, fid_files):
    """Blocks of 3 summed in float64 give the mean, covariance and FID of all 7 samples at once:
    latents decoded by the VAE, uint8 as `soflow sample` writes them, balanced class labels."""
    from soflow.data.vae import decode, load_vae
    from soflow.eval.fid import frechet_distance, load_stats, statistics
    from soflow.eval.inception import InceptionFeatures
    from soflow.plots import to_uint8
    from soflow.sampling import sample
    from soflow.run.build import build_flow
    from soflow.run.config import load

    _, ref, weights = fid_files
    vae = tiny_vae(tmp_path / "vae")
    cfg = load("imagenet-dit-b4", ["model.net=dit-tiny", f"data.path={latent_data(tmp_path)}", f"data.vae={vae}",
                                   "train.fid_every=5", f"train.fid_ref={ref}", f"train.fid_inception={weights}",
                                   "train.fid_dims=64", "train.fid_num=7", "train.fid_batch_size=3", "train.seed=4"])
    fid = open_fid(cfg, tmp_path / "run")
    flow = build_flow(cfg, (4, 8, 8), 1000)
    randomize(flow.net, std=0.05)
    mu, sigma = fid.statistics(flow, 2)

    x = sample(flow, 7, nfe=2, seed=4, labels=torch.arange(7), mode="renoise")  # the preset's train.sample_mode
    images = torch.from_numpy(to_uint8(decode(load_vae(str(vae)), x))).permute(0, 3, 1, 2)
    expected = statistics(InceptionFeatures(weights, device="cpu", features=("64",))(images))
    np.testing.assert_allclose(mu, expected[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sigma, expected[1], rtol=1e-7, atol=1e-10)
    assert fid.scores(flow)["fid_nfe2"] == pytest.approx(frechet_distance(*expected, *load_stats(ref)), rel=1e-6)


def test_two_ranks_score_what_one_rank_scores_on_the_same_weights(tmp_path, fid_files):
    """A two-rank FSDP run (gloo) logs FID of its EMA at step 2 (9 samples in blocks of 3: rank 1 has
    one block fewer and keeps step with a throw-away forward); the same function in one process on
    the EMA weights kept in best-fid.pt gives the same scores."""
    from soflow.run.load import load_run

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                           "soflow", *map(str, train_args(run, fid_files, "--set", "train.total_steps=2", "--set",
                                                          "train.fid_every=2", "--set", "train.fid_num=9", "--set",
                                                          "train.fsdp=true"))],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (logged,) = fid_records(run)
    cfg, flow, step = load_run(run / "checkpoints" / "best-fid.pt")
    assert step == 2 and flow.num_classes == 10  # class-conditional: balanced labels on both sides
    one_rank = open_fid(cfg, tmp_path / "one").scores(flow)
    for key in ("fid_nfe1", "fid_nfe2"):
        assert one_rank[key] == pytest.approx(logged[key], rel=1e-6)
