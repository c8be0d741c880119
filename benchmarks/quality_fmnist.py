"""SoFlow, MeanFlow and flow matching at equal steps on Fashion-MNIST, class-conditional with
training-time guidance for each method.  Classifier Frechet distance and class accuracy at 1 and
2 NFE (flow matching also at 8 and 32 Euler steps); JSON plus sample grids.

    python benchmarks/quality_fmnist.py --steps 2100 --out benchmarks/results/quality-fmnist.json

Budget: every method trains the fmnist preset's network for --steps steps at its batch size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

from soflow.eval.run import eval_fmnist
from soflow.plots import image_grid
from soflow.sampling import generate
from soflow.train.config import load
from soflow.train.load import load_run
from soflow.train.loop import train

NFES = {"soflow": (1, 2), "meanflow": (1, 2), "flow_matching": (1, 2, 8, 32)}
# The same effective training target for the guided methods: the fmnist preset's SoFlow setting
# (w = 2, m = 0.5) gives v + 0.5 v_cond - 0.5 v_uncond, which is MeanFlow's omega = 1, kappa = 0.5;
# SoFlow's decay above t = 0.8 is matched by MeanFlow's interval t <= 0.8.
GUIDANCE = {"soflow": [], "meanflow": ["meanflow.omega=1.0", "meanflow.kappa=0.5", "meanflow.t_max=0.8",
                                       "meanflow.cfg_drop_rate=0.1"],
            "flow_matching": ["flow_matching.cfg_drop_rate=0.1"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2100)
    ap.add_argument("--runs", default="runs/quality-fmnist")
    ap.add_argument("--out", default="benchmarks/results/quality-fmnist.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    for method, nfes in NFES.items():
        cfg = load("fmnist", [f"method={method}", f"train.total_steps={args.steps}", *GUIDANCE[method]])
        run = Path(args.runs) / method
        start = time.perf_counter()
        train(cfg, run)
        results[method] = {"train_seconds": time.perf_counter() - start, "nfe": {}}
        _, flow, _ = load_run(run, warn=lambda m: None)
        for nfe in nfes:
            results[method]["nfe"][nfe] = eval_fmnist(run, nfe)
            labels = torch.arange(10).repeat_interleave(10)
            image_grid(out.with_name(f"{out.stem}-{method}-nfe{nfe}.png"),
                       generate(method, flow, 100, nfe, seed=0, labels=labels), rows=10)
        print(method, json.dumps(results[method]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out.write_text(json.dumps({"config": vars(args), "commit": commit, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
