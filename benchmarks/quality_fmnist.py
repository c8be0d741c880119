"""SoFlow, MeanFlow and flow matching at equal steps on Fashion-MNIST, class-conditional with
guidance for each method.  Classifier Frechet distance and class accuracy (1000 samples, 100 per
class, against the real test split) at 1 and 2 NFE, flow matching also at 8 and 32 Euler steps;
JSON plus one sample grid per method and NFE.

    python benchmarks/quality_fmnist.py --steps 1000 --out benchmarks/results/quality-fmnist.json

Budget: every method trains the fmnist preset's network (1.9M-parameter DiT) for --steps steps at
the preset's batch size (64); the JSON records each run's wall time.  A row `real data` scores
1000 real training images (100 per class) the same way: the floor of this metric at this size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from soflow.data.images import fashion_mnist, to_float
from soflow.eval.run import eval_fmnist, fmnist_scores
from soflow.plots import image_grid
from soflow.methods import generate
from soflow.run.config import load
from soflow.run.load import load_run
from soflow.train.loop import train

from record import git_commit, write_json  # benchmarks/record.py

# method -> (config overrides, NFEs, sampling-time guidance).
# The same effective guidance for every method, 2: the fmnist preset's SoFlow setting (w = 2,
# m = 0.5) trains towards v + 0.5 v_cond - 0.5 v_uncond, which is MeanFlow's omega = 1, kappa = 0.5
# (omega / (1 - kappa) = 2); SoFlow's decay above t = 0.8 is matched by MeanFlow's interval t <= 0.8.
# Flow matching has no training-time guidance: it is sampled with classifier-free guidance 2,
# which costs two forwards (one doubled batch) per step.
METHODS = {
    "soflow": ([], (1, 2), 1.0),
    "meanflow": (["meanflow.omega=1.0", "meanflow.kappa=0.5", "meanflow.t_max=0.8", "meanflow.cfg_drop_rate=0.1"],
                 (1, 2), 1.0),
    "flow_matching": (["flow_matching.cfg_drop_rate=0.1"], (1, 2, 8, 32), 2.0),
}


def real_data_row(per_class: int = 100) -> dict:
    """The scores of real training images (the first per_class of each class)."""
    train_set = fashion_mnist(split="train")
    index = torch.cat([torch.nonzero(train_set.labels == c)[:per_class, 0] for c in range(10)])
    return fmnist_scores(to_float(train_set.images[index]), train_set.labels[index])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--runs", default="runs/quality-fmnist")
    ap.add_argument("--out", default="benchmarks/results/quality-fmnist.json")
    args = ap.parse_args()
    out = Path(args.out)
    results = {"real_data": real_data_row()}
    print("real data", json.dumps(results["real_data"]), flush=True)
    for method in args.methods:
        overrides, nfes, guidance = METHODS[method]
        cfg = load("fmnist", [f"method={method}", f"train.total_steps={args.steps}", *overrides])
        run = Path(args.runs) / method
        start = time.perf_counter()
        if train(cfg, run)["stopped"]:
            raise SystemExit(f"{run}: training stopped by a signal; rerun the same command to resume")
        results[method] = {"train_seconds": time.perf_counter() - start, "batch_size": cfg.train.batch_size,
                           "guidance": guidance, "nfe": {}}
        _, flow, _ = load_run(run, warn=lambda m: None)
        for nfe in nfes:
            results[method]["nfe"][nfe] = eval_fmnist(run, nfe, guidance=guidance)
            labels = torch.arange(10).repeat_interleave(10)
            image_grid(out.with_name(f"{out.stem}-{method}-nfe{nfe}.png"),
                       generate(method, flow, 100, nfe, seed=0, labels=labels, guidance=guidance), rows=10)
        print(method, json.dumps(results[method]), flush=True)
        # written after every method, so a long benchmark that is stopped keeps what it measured
        write_json(out, {"config": vars(args), "commit": git_commit(), "results": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
