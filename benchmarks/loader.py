"""Does data loading keep up with training?  Samples/s of the data stream alone against the
samples/s of full training steps, for the fmnist preset (real Fashion-MNIST) and for SD-VAE
latents (synthetic shards of ImageNet-256 latent shape, 4x32x32, with the imagenet-dit-b4 recipe
on a small DiT).  Writes JSON.

    python benchmarks/loader.py --out benchmarks/results/loader.json

With --scale it measures full-size latent stores instead (class-ordered, written by
benchmarks/write_latents.py under --stores, 4x8x8 latents, 1000 classes):
  - peak RSS of a real 2-step `soflow train` run (dit-tiny, batch 256) at 20k and 1M items, for
    the encode-latents folder and the reference hdf5;
  - loader samples/s at 1M items against the training step's samples/s;
  - the per-step cost of choosing the indices of a batch at 1,281,167 items (ImageNet);
  - the class balance of the objective's row groups (flow-matching rows first, consistency rows
    after them): 1000 classes, batch 256, 30 steps.

    python benchmarks/loader.py --scale --stores /tmp/stores --label after \
        --out benchmarks/results/loader-scale-after.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from soflow.data import make_dataset
from soflow.data.stream import batches
from soflow.run.build import build_flow, build_objective
from soflow.run.config import load

from record import git_commit, write_json  # benchmarks/record.py
from write_latents import write_folder, write_hdf5  # benchmarks/write_latents.py


def loader_rate(data, per_rank: int, n_batches: int, **kw) -> float:
    stream = batches(data, seed=0, rank=0, world=1, per_rank=per_rank, start=0, **kw)
    next(stream)  # start-up (workers, first epoch permutation)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(stream)
    return n_batches * per_rank / (time.perf_counter() - start)


def step_rate(cfg, data, n_steps: int) -> float:
    """Training samples/s (median step time) of the recipe `cfg` on `data`."""
    return interleaved_rates(cfg, data, n_steps)["train_samples_per_s"]


def fake_latents(folder: Path, n: int = 20000, shard: int = 4096):
    rng = np.random.default_rng(0)
    shards = (n + shard - 1) // shard
    for i in range(shards):
        m = min(shard, n - i * shard)
        d = folder / f"shard-{i:05d}"
        d.mkdir(parents=True)
        np.save(d / "mean.npy", rng.normal(size=(m, 4, 32, 32)).astype(np.float32))
        np.save(d / "std.npy", np.full((m, 4, 32, 32), 0.1, np.float32))
        np.save(d / "labels.npy", rng.integers(0, 1000, m))
    (folder / "meta.json").write_text(json.dumps({"num_images": n, "num_shards": shards, "shard_size": shard,
                                                 "classes": [str(k) for k in range(1000)], "resolution": 256}))


IMAGENET_ITEMS = 1_281_167
SCALE_SIZES = (20_000, 1_000_000)
TINY = ["model.net=dit-tiny", "train.batch_size=256"]


def store_path(root: Path, kind: str, n: int) -> Path:
    """data.path of a store; written when missing.  hdf5: the file itself, which every reader accepts."""
    folder = root / f"{kind}-{n}"
    target = folder if kind == "folder" else folder / "imagenet_latent.hdf5"
    if not (folder / "done").is_file():
        (write_folder(folder, n) if kind == "folder" else write_hdf5(target, n))
        (folder / "done").write_text("")
    return target


def _memory_kb(pid: int) -> dict:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {k: int(fields[k].split()[0]) for k in ("RssAnon", "RssFile") if k in fields}


def peak_rss_of_train(data_path: Path, run_dir: Path) -> dict:
    """Peak memory of a 2-step `soflow train` run: ru_maxrss of the child (all of its resident pages,
    shared-library pages included, which vary with the machine's page-cache pressure) and the peak
    of its anonymous resident memory (the process's own heap: where a dataset read into RAM lands),
    polled every 10 ms from /proc."""
    cmd = [sys.executable, "-m", "soflow", "train", "--config", "imagenet-dit-b4", "--run-dir", str(run_dir)]
    for kv in [f"data.path={data_path}", *TINY, "train.total_steps=2", "train.log_every=1", "train.sample_nfe=[1]",
               "train.device=cpu"]:
        cmd += ["--set", kv]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak_anon = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak_anon = max(peak_anon, _memory_kb(proc.pid).get("RssAnon", 0))
        time.sleep(0.01)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"train failed on {data_path} (exit {proc.returncode})")
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "peak_anon_mb": peak_anon / 1024,
            "wall_s": time.perf_counter() - start}


def index_cost(steps: int = 50, per_rank: int = 256) -> dict:
    """Seconds per call of epoch_indices at ImageNet size, steps inside one epoch."""
    from soflow.data.sampler import epoch_indices

    times = []
    for k in range(steps):
        t0 = time.perf_counter()
        epoch_indices(IMAGENET_ITEMS, k, 0, 1, per_rank, 0)
        times.append(time.perf_counter() - t0)
    return {"items": IMAGENET_ITEMS, "first_call_s": times[0], "median_s": float(np.median(times)),
            "mean_s": float(np.mean(times)), "calls": steps}


def class_balance(data, steps: int = 30, batch: int = 256) -> dict:
    """Labels of the rows SoFlowLoss gives to each loss, over `steps` batches of the data stream.

    The real objective of the imagenet-dit-b4 recipe splits each batch; its `losses` is replaced by
    a recorder of the two row groups' sizes (no network is needed to see the split)."""
    cfg = load("imagenet-dit-b4", TINY)
    objective = build_objective(cfg)
    sizes = []

    def record(flow, fm, cons, net=None):
        sizes.append((len(fm), len(cons)))
        zero = torch.zeros(())
        return zero, zero, {}

    objective.losses = record
    flow = types.SimpleNamespace(num_classes=data.num_classes)
    stream = batches(data, cfg.train.seed, 0, 1, batch, 0)
    fm_labels, cons_labels = [], []
    for step in range(steps):
        x0, y = next(stream)
        objective(flow, x0, y, step=step)
        n_fm, _ = sizes[-1]
        fm_labels.append(y[:n_fm])
        cons_labels.append(y[n_fm:])
    fm, cons = torch.cat(fm_labels), torch.cat(cons_labels)
    k = data.num_classes
    return {"classes": k, "steps": steps, "batch": batch, "fm_rows": len(fm), "consistency_rows": len(cons),
            "fm_share_lower_half": float((fm < k // 2).float().mean()),
            "consistency_share_lower_half": float((cons < k // 2).float().mean()),
            "classes_without_consistency_row": int(k - len(cons.unique())),
            "classes_without_consistency_row_if_uniform": k * (1 - 1 / k) ** len(cons)}


def interleaved_rates(cfg, data, n_steps: int) -> dict:
    """Samples/s of the data stream and of the training step, timed alternately in one loop (the
    loop of `soflow train`: fetch a batch, then step), so that both see the same machine load."""
    torch.manual_seed(0)
    flow = build_flow(cfg, data.sample_shape, data.num_classes)
    objective = build_objective(cfg)
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-4)
    batch = cfg.train.batch_size
    stream = batches(data, cfg.train.seed, 0, 1, batch, 0)
    load_s, step_s = [], []
    for i in range(n_steps + 1):  # the first round warms up
        t0 = time.perf_counter()
        x0, y = next(stream)
        t1 = time.perf_counter()
        loss, _ = objective(flow, x0, y, step=i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        load_s.append(t1 - t0)
        step_s.append(time.perf_counter() - t1)
    r = {"batch": batch, "steps": n_steps, "loader_samples_per_s": batch / float(np.median(load_s[1:])),
         "train_samples_per_s": batch / float(np.median(step_s[1:]))}
    r["loader_over_train"] = r["loader_samples_per_s"] / r["train_samples_per_s"]
    return r


def warm_page_cache(path: Path) -> float:
    """Read every file of a store once, so the rate below is the loader's, not the disk's."""
    t0 = time.perf_counter()
    for file in ([path] if path.is_file() else sorted(path.rglob("*.npy"))):
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass
    return time.perf_counter() - t0


def scale(args) -> dict:
    root = Path(args.stores)
    parts = args.parts.split(",")
    result = {"label": args.label, "rss": {}, "balance": {}, "rate": {}}
    if "index" in parts:
        result["index_choice"] = index_cost()
        print(json.dumps(result["index_choice"]), flush=True)
    for kind in ("folder", "hdf5") if "balance" in parts else ():
        data = make_dataset(load("imagenet-dit-b4", [f"data.path={store_path(root, kind, SCALE_SIZES[0])}"]).data)
        result["balance"][kind] = class_balance(data)
        print(kind, json.dumps(result["balance"][kind]), flush=True)
    for kind in ("folder", "hdf5") if "rss" in parts else ():
        for n in SCALE_SIZES:
            runs = []
            for _ in range(args.repeats):  # the machine is shared: the median of a few runs
                with tempfile.TemporaryDirectory() as run:
                    runs.append(peak_rss_of_train(store_path(root, kind, n), Path(run)))
            result["rss"][f"{kind}-{n}"] = {key: float(np.median([r[key] for r in runs]))
                                            for key in ("peak_rss_mb", "peak_anon_mb")} | {"runs": runs}
            print(kind, n, json.dumps(result["rss"][f"{kind}-{n}"]), flush=True)
        for key in ("peak_rss_mb", "peak_anon_mb"):
            small, big = (result["rss"][f"{kind}-{n}"][key] for n in SCALE_SIZES)
            result["rss"][f"{kind}-growth-{key}"] = big - small
    cfg = load("imagenet-dit-b4", TINY)
    for kind in ("folder", "hdf5") if "rate" in parts else ():
        path = store_path(root, kind, SCALE_SIZES[1])
        warm = warm_page_cache(path)
        t0 = time.perf_counter()
        data = make_dataset(load("imagenet-dit-b4", [f"data.path={path}"]).data)
        opened = time.perf_counter() - t0
        r = {"items": len(data), "warm_page_cache_s": warm, "open_s": opened,
             **interleaved_rates(cfg, data, args.steps)}
        result["rate"][kind] = r
        print(kind, json.dumps(r), flush=True)
        del data
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out")
    ap.add_argument("--scale", action="store_true", help="full-size latent stores (see above)")
    ap.add_argument("--stores", default="/tmp/soflow-stores", help="--scale: folder for the synthetic stores")
    ap.add_argument("--parts", default="index,balance,rss,rate", help="--scale: which measurements")
    ap.add_argument("--repeats", type=int, default=3, help="--scale: training runs per RSS figure")
    ap.add_argument("--label", default="", help="--scale: a name for this run in the JSON (e.g. before / after)")
    args = ap.parse_args()
    if args.scale:
        result = scale(args)
        result["threads"], result["commit"] = torch.get_num_threads(), git_commit()
        result["soflow"] = str(Path(sys.modules["soflow"].__file__).parent)
        print(json.dumps(result, indent=1))
        if args.out:
            write_json(args.out, result)
        return
    result = {}
    cfg = load("fmnist")
    data = make_dataset(cfg.data)
    result["fmnist"] = {"loader_samples_per_s": loader_rate(data, cfg.train.batch_size, 200),
                        "train_samples_per_s": step_rate(cfg, data, args.steps), "batch": cfg.train.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        fake_latents(Path(tmp))
        cfg = load("imagenet-dit-b4", [f"data.path={tmp}", "model.net=dit-s2", "train.batch_size=32"])
        data = make_dataset(cfg.data)
        result["latents_dit_s2"] = {"loader_samples_per_s": loader_rate(data, 32, 50),
                                    "train_samples_per_s": step_rate(cfg, data, args.steps), "batch": 32}
    for r in result.values():
        r["loader_over_train"] = r["loader_samples_per_s"] / r["train_samples_per_s"]
    result["threads"], result["commit"] = torch.get_num_threads(), git_commit()
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
