"""One rehearsal of the ImageNet path at toy size: the `imagenet-dit-b4` preset on two gloo ranks
with `dit-tiny`, a class-ordered 4x8x8 latent store in both layouts, FID while training (samples
decoded by a tiny VAE, random Inception weights, the 64-feature layer), --stop-after and resume,
then sampling on two ranks against one process.

Both stores hold the same items (benchmarks/write_latents.py, one seed), so a run reads the same
batches from either; the readers are checked to agree first.  The uninterrupted run then reads the
reference hdf5 and the interrupted one the encode-latents folder, and they must end with the same
weights, FID scores and samples.  Every launch is a real torchrun or `python -m soflow` process;
the module's runs are shared by its tests."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from helpers import soflow
from test_data import tiny_vae

pytest.importorskip("torch_fidelity")
pytest.importorskip("h5py")

ITEMS, CLASSES, SHAPE = 64, 1000, (4, 8, 8)  # the hdf5 reader always reports ImageNet's 1000 classes
STEPS, STOP, FID_EVERY = 4, 2, 2


def write_latents_module():
    """benchmarks/write_latents.py: the class-ordered synthetic store of the loader benchmark."""
    spec = importlib.util.spec_from_file_location("write_latents", REPO / "benchmarks" / "write_latents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchrun(*args, timeout=300) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node=2 -m soflow ARGS` (gloo on CPU), which must succeed."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                           "soflow", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-8000:]
    return proc


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, random_inception_weights):
    """Both latent stores, a tiny VAE folder, and 64-feature reference statistics of 8 random images."""
    from soflow.eval.run import fid_reference

    root = tmp_path_factory.mktemp("rehearsal")
    writer = write_latents_module()
    folder = writer.write_folder(root / "folder", ITEMS, CLASSES, SHAPE, shard_size=24)  # 3 shards, the last short
    hdf5 = writer.write_hdf5(root / "h5" / "imagenet_latent.hdf5", ITEMS, CLASSES, SHAPE)
    rng = np.random.default_rng(0)
    np.savez(root / "real.npz", arr_0=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    ref, _ = fid_reference(str(root / "real.npz"), root / "ref.npz", random_inception_weights, "cpu", dims="64")
    return {"folder": folder, "hdf5": hdf5, "vae": tiny_vae(root / "vae"), "ref": ref,
            "inception": random_inception_weights}


def train_args(run, data, inputs) -> list:
    sets = [f"data.path={data}", f"data.vae={inputs['vae']}", "model.net=dit-tiny", "train.device=cpu",
            "train.batch_size=8", f"train.total_steps={STEPS}", "train.log_every=1", "train.sample_nfe=[1]",
            f"train.fid_every={FID_EVERY}", f"train.fid_ref={inputs['ref']}", f"train.fid_inception={inputs['inception']}",
            "train.fid_dims=64", "train.fid_num=6", "train.fid_batch_size=4", "train.fid_nfe=[1, 2]"]
    return ["train", "--config", "imagenet-dit-b4", "--run-dir", run, *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
    """An uninterrupted run on the hdf5, and one on the folder stopped after STOP steps and
    restarted with the same command: (whole, parts, output of the first call, of the second)."""
    root = tmp_path_factory.mktemp("runs")
    whole, parts = root / "whole", root / "parts"
    torchrun(*train_args(whole, inputs["hdf5"], inputs))
    first = torchrun(*train_args(parts, inputs["folder"], inputs), "--stop-after", STOP)
    second = torchrun(*train_args(parts, inputs["folder"], inputs), "--stop-after", STOP)
    return whole, parts, first.stdout, second.stdout


def fid_records(run: Path) -> list[dict]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [{k: v for k, v in r.items() if k == "step" or k.startswith("fid_nfe")} for r in records
            if "fid_nfe1" in r]


def final_checkpoint(run: Path) -> dict:
    from soflow.run.checkpoint import list_checkpoints, read_checkpoint

    return read_checkpoint(list_checkpoints(run)[0][1])


def test_both_layouts_give_the_same_batches(inputs):
    from soflow.data.latents import LatentData

    folder, hdf5 = LatentData(str(inputs["folder"])), LatentData(str(inputs["hdf5"].parent))
    assert folder.num_classes == hdf5.num_classes == CLASSES and folder.sample_shape == hdf5.sample_shape == SHAPE
    for position in (0, 3):  # 20 rows a rank: every shard, and an epoch end at position 3
        for a, b in zip(folder.batch(42, position, 1, 2, 20), hdf5.batch(42, position, 1, 2, 20)):
            assert torch.equal(a, b)


def test_resumed_run_ends_with_the_uninterrupted_weights(runs):
    whole, parts, first, second = runs
    assert f"stopped at step {STOP}" in first
    assert f"resumed from {parts / 'checkpoints' / f'ckpt-{STOP:08d}.pt'} at step {STOP}" in second
    a, b = final_checkpoint(whole), final_checkpoint(parts)
    assert a["step"] == b["step"] == STEPS and a["world_size"] == b["world_size"] == 2
    for key in ("net", "ema"):
        assert set(a[key]) == set(b[key])
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}/{name} differs after the resume"


def test_fid_logged_at_both_nfes_and_best_checkpoint_kept(runs):
    whole, parts, _, _ = runs
    records = fid_records(whole)
    assert [r["step"] for r in records] == list(range(FID_EVERY, STEPS + 1, FID_EVERY))
    assert all(np.isfinite(r["fid_nfe1"]) and np.isfinite(r["fid_nfe2"]) for r in records)
    assert fid_records(parts) == records  # the same EMA weights at every scored step
    for run in (whole, parts):
        best = json.loads((run / "checkpoints" / "best-fid.json").read_text())
        assert (run / "checkpoints" / "best-fid.pt").is_file()
        assert best["metric"] == "fid_nfe1" and best["score"] == min(r["fid_nfe1"] for r in records)


def test_two_rank_sample_writes_the_bytes_of_one_process(runs, tmp_path):
    whole, parts, _, _ = runs
    args = ["-n", 16, "--nfe", 2, "--seed", 3, "--batch-size", 4]  # ranks hold samples [0, 8) and [8, 16)
    torchrun("sample", "--checkpoint", parts, *args, "--out", tmp_path / "two.npz")
    soflow("sample", "--checkpoint", whole, *args, "--out", tmp_path / "one.npz", check=True)
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        assert one["arr_0"].shape == (16, 16, 16, 3) and one["arr_0"].dtype == np.uint8
        assert np.array_equal(one["arr_0"], two["arr_0"])
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()


def test_restart_that_reaches_total_steps_finishes_the_run(runs):
    """The second call of the same command reaches the last step: the run is complete, so it
    writes the export and final samples, as the uninterrupted run does, and asks for no rerun."""
    whole, parts, _, second = runs
    assert "rerun the same command to resume" not in second
    for run in (whole, parts):
        assert (run / "exports" / f"ema-{STEPS:08d}.safetensors").is_file()
        assert (run / "samples" / f"step{STEPS:08d}-nfe1.png").is_file()
