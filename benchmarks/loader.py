"""Does data loading keep up with training?  Samples/s of the data stream alone against the
samples/s of full training steps, for the fmnist preset (real Fashion-MNIST) and for SD-VAE
latents (synthetic shards of ImageNet-256 latent shape, 4x32x32, with the imagenet-dit-b4 recipe
on a small DiT).  Writes JSON.

    python benchmarks/loader.py --out benchmarks/results/loader.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from soflow.data import make_dataset
from soflow.data.stream import batches
from soflow.train.build import build_flow, build_objective
from soflow.train.config import load

from record import git_commit, write_json  # benchmarks/record.py


def loader_rate(data, per_rank: int, n_batches: int, **kw) -> float:
    stream = batches(data, seed=0, rank=0, world=1, per_rank=per_rank, start=0, **kw)
    next(stream)  # start-up (workers, first epoch permutation)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(stream)
    return n_batches * per_rank / (time.perf_counter() - start)


def step_rate(cfg, data, n_steps: int) -> float:
    torch.manual_seed(0)
    flow = build_flow(cfg, data.sample_shape, data.num_classes)
    objective = build_objective(cfg)
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-4)
    stream = batches(data, 0, 0, 1, cfg.train.batch_size, 0)
    times = []
    for i in range(n_steps + 1):
        x0, y = next(stream)
        t0 = time.perf_counter()
        loss, _ = objective(flow, x0, y, step=i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return cfg.train.batch_size / float(np.median(times[1:]))


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
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
