"""Latent stores as they are really laid out: sorted by class.

SoFlowLoss gives the first rows of a batch to the flow-matching loss and the rest to the
consistency loss (MeanFlowLoss: the first rows keep r < t), so the rows of a batch must come in
random order, on one rank and on several, for the encode-latents folder and the reference hdf5.
"""

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, soflow
from soflow.data import DataError
from soflow.data.latents import LatentData
from soflow.data.vae import SCALE
from soflow.data.sampler import epoch_indices
from soflow.data.stream import batches

h5py = pytest.importorskip("h5py")

ITEMS, CLASSES, SHAPE = 2000, 50, (4, 4, 4)
RATIO = 0.75  # imagenet-dit-b4's velocity_loss_ratio: the first 75 % of rows are flow-matching rows


def class_ordered(n=ITEMS, classes=CLASSES):
    """Labels sorted by class, and means that name their own row (row i is all i), stds 0."""
    labels = np.arange(n) * classes // n
    mean = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, *SHAPE)).copy()
    return mean, np.zeros_like(mean), labels


def write_folder(folder: Path, shard_size=256) -> Path:
    mean, std, labels = class_ordered()
    shards = (ITEMS + shard_size - 1) // shard_size
    for i in range(shards):
        sl = slice(i * shard_size, (i + 1) * shard_size)
        (folder / f"shard-{i:05d}").mkdir(parents=True)
        for name, arr in (("mean", mean), ("std", std), ("labels", labels)):
            np.save(folder / f"shard-{i:05d}" / f"{name}.npy", arr[sl])
    (folder / "meta.json").write_text(json.dumps({"num_images": ITEMS, "num_shards": shards, "shard_size": shard_size,
                                                  "classes": [str(k) for k in range(CLASSES)], "resolution": 32}))
    return folder


def write_hdf5(file: Path, chunks=None, **replace) -> Path:
    """h5py's default contiguous layout, or chunked and compressed (read through h5py) with chunks=(rows, ...)."""
    mean, std, labels = class_ordered()
    datasets = {"latents": np.concatenate([mean, std], axis=1), "labels": labels, "amount": ITEMS, "latent_size": 4}
    file.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(file, "w") as f:
        for name, value in {**datasets, **replace}.items():
            if name == "latents" and chunks:
                f.create_dataset(name, data=value, chunks=chunks, compression="gzip")
            elif value is not None:
                f[name] = value
    return file


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return {"folder": write_folder(root / "folder"), "hdf5": write_hdf5(root / "h5" / "imagenet_latent.hdf5"),
            "hdf5-chunked": write_hdf5(root / "h5c" / "imagenet_latent.hdf5", chunks=(64, 8, 4, 4)),
            # half floats and [N, 1] labels, read raw from the file: the bytes must be taken as float16
            "hdf5-f16": write_hdf5(root / "h5f" / "imagenet_latent.hdf5", latents=np.concatenate(
                class_ordered()[:2], axis=1).astype(np.float16), labels=class_ordered()[2][:, None])}


def assert_balanced(fm: np.ndarray, cons: np.ndarray, classes: int = CLASSES):
    """Both row groups draw from both halves of the label range, and most classes reach the consistency loss."""
    lower = lambda y: float((y < classes // 2).mean())
    assert 0.4 < lower(fm) < 0.6, f"flow-matching rows: {lower(fm):.1%} from the lower half of the classes"
    assert 0.35 < lower(cons) < 0.65, f"consistency rows: {lower(cons):.1%} from the lower half of the classes"
    covered = len(np.unique(cons))
    assert covered >= 0.8 * classes, f"only {covered} of {classes} classes reach the consistency rows"


@pytest.mark.parametrize("kind", ["folder", "hdf5", "hdf5-chunked"])
def test_one_rank_row_groups_see_every_class(stores, kind):
    data = LatentData(str(stores[kind]))
    stream = batches(data, seed=42, rank=0, world=1, per_rank=64, start=0)
    fm, cons = [], []
    for _ in range(10):
        _, y = next(stream)
        n_v = int(RATIO * len(y))
        fm.append(y[:n_v].numpy())
        cons.append(y[n_v:].numpy())
    assert_balanced(np.concatenate(fm), np.concatenate(cons))


@pytest.mark.parametrize("kind", ["folder", "hdf5", "hdf5-chunked", "hdf5-f16"])
def test_rows_come_in_stream_order_with_their_labels(stores, kind):
    """Row j of a batch is item epoch_indices[j], label included, also across an epoch end."""
    data = LatentData(str(stores[kind]))
    _, _, labels = class_ordered()
    for position in (0, 5):  # 360 * 5 = 1800: position 5 wraps into the next epoch
        idx = epoch_indices(ITEMS, position, 0, 1, 360, 7)
        x, y = data.batch(7, position, 0, 1, 360)
        expected = idx.float()[:, None, None, None].expand(-1, *SHAPE) * SCALE
        assert torch.equal(x, expected)
        assert torch.equal(y, torch.from_numpy(labels)[idx])
    assert len(set(idx.tolist())) < 360  # the wrapped batch holds an item twice, read correctly


WORKER = textwrap.dedent("""
    import json, os, sys
    from soflow.data.latents import LatentData
    from soflow.data.stream import batches
    from soflow import distributed
    from soflow.run.config import load
    from soflow.train.loop import per_rank_batch

    out, paths = sys.argv[1], sys.argv[2:]
    env = distributed.setup("cpu")  # gloo process group, as `soflow train` starts it
    record = {}
    for path in paths:
        cfg = load("imagenet-dit-b4", [f"data.path={path}", "train.batch_size=192", "train.grad_accum=2"])
        per_rank = per_rank_batch(cfg, env.world)
        data = LatentData(cfg.data.path)
        # the training loop's stream: micro-batch m of step k is data position k * grad_accum + m
        stream = batches(data, cfg.train.seed, env.rank, env.world, per_rank, start=0)
        n_v = int(cfg.objective.velocity_loss_ratio * per_rank)
        groups = {"fm": [], "cons": []}
        for step in range(10):
            for micro in range(cfg.train.grad_accum):
                _, y = next(stream)
                groups["fm"] += y[:n_v].tolist()
                groups["cons"] += y[n_v:].tolist()
        record[path] = groups
    with open(os.path.join(out, f"rank{env.rank}.json"), "w") as f:
        json.dump(record, f)
    distributed.teardown(env)
""")


def test_several_ranks_row_groups_see_every_class(stores, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
                           worker, tmp_path, stores["folder"], stores["hdf5"]], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(3):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for path in (stores["folder"], stores["hdf5"]):
            groups = record[str(path)]
            assert len(groups["fm"]) == 10 * 2 * 24 and len(groups["cons"]) == 10 * 2 * 8
            assert_balanced(np.array(groups["fm"]), np.array(groups["cons"]))


def _read_in_child(data, queue):
    queue.put(data.batch(3, 5, 0, 1, 32)[0].numpy())


@pytest.mark.parametrize("kind", ["hdf5", "hdf5-chunked"])
def test_hdf5_folder_path_and_forked_readers(stores, kind):
    """data.path may be the folder holding imagenet_latent.hdf5; a forked process reads on its own."""
    data = LatentData(str(stores[kind].parent))
    x, _ = data.batch(3, 5, 0, 1, 32)  # the chunked file is now open in this process
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(data, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and np.array_equal(got, x.numpy())
    assert torch.equal(data.batch(3, 5, 0, 1, 32)[0], x)  # the parent's handle still works


@pytest.mark.parametrize("replace, needle", [
    ({"labels": None}, "no dataset 'labels'"),
    ({"latents": np.zeros((ITEMS, 3, 4, 4), np.float32)}, "expected [N, 2C, H, W]"),
    ({"latents": np.zeros((ITEMS, 8, 4), np.float32)}, "expected [N, 2C, H, W]"),
    ({"labels": np.array([b"x"] * ITEMS)}, "dataset labels has dtype"),
    ({"labels": np.full(ITEMS, 1000)}, "labels out of range"),
    ({"amount": ITEMS + 1}, "amount is 2001"),
])
def test_malformed_hdf5_is_one_clear_line(tmp_path, replace, needle):
    file = write_hdf5(tmp_path / "imagenet_latent.hdf5", **replace)
    with pytest.raises(DataError) as err:
        LatentData(str(file))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_malformed_hdf5_from_the_command_line(tmp_path):
    write_hdf5(tmp_path / "store" / "imagenet_latent.hdf5", latents=np.array([b"x"] * ITEMS))
    proc = soflow("train", "--config", "imagenet-dit-b4", "--run-dir", tmp_path / "run", "--set",
                  f"data.path={tmp_path / 'store'}", "--set", "model.net=dit-tiny", "--set", "train.device=cpu")
    assert_one_line_error(proc, "imagenet_latent.hdf5", "dataset latents has dtype")


def test_epoch_permutation_is_drawn_once_per_epoch():
    """Choosing a batch slices a cached permutation, the same one torch.randperm drew before."""
    from soflow.data.sampler import epoch_permutation
    from soflow.seeding import generator

    size = 10_007
    epoch_permutation.cache_clear()
    for step in range(size // 64):
        epoch_indices(size, step, 0, 1, 64, 5)
    assert epoch_permutation.cache_info().misses == 1
    for step, rank, world in ((0, 0, 1), (155, 1, 2), (78, 0, 2), (400, 1, 3)):
        start = (step * world + rank) * 64
        pos = torch.arange(start, start + 64)
        expected = torch.stack([torch.randperm(size, generator=generator(5, int(p // size)))[p % size] for p in pos])
        assert torch.equal(epoch_indices(size, step, rank, world, 64, 5), expected)
