"""SoFlow, MeanFlow and flow matching at equal training steps on 2-D toys (checkerboard, moons).

Each (dataset, method, seed) trains the toy2d preset's network for the same number of steps;
energy distance and sliced W2 to fresh data are measured at 1 and 2 NFE (flow matching at 1, 2,
8 and 100 Euler steps).  Writes JSON and a figure.

    python benchmarks/quality_toy.py --steps 3000 --out benchmarks/results/quality-toy.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from soflow.data import make_dataset
from soflow.eval import energy_distance, sliced_wasserstein2
from soflow.sampling import generate
from soflow.train.config import load
from soflow.train.load import load_run
from soflow.train.loop import train

NFES = {"soflow": (1, 2), "meanflow": (1, 2), "flow_matching": (1, 2, 8, 100)}


def run_one(dataset: str, method: str, seed: int, steps: int, num: int, folder: Path, extra: list[str]):
    cfg = load("toy2d", [f"method={method}", f"data.name={dataset}", f"train.total_steps={steps}", f"train.seed={seed}",
                         f"train.log_every={steps}", f"train.checkpoint_every={steps}", "train.sample_nfe=[1]",
                         *extra])
    run = folder / f"{dataset}-{method}-{seed}"
    start = time.perf_counter()
    train(cfg, run)
    seconds = time.perf_counter() - start
    _, flow, _ = load_run(run, warn=lambda m: None)
    ref = make_dataset(cfg.data).reference(num, seed=1000 + seed)
    out = {"train_seconds": seconds, "nfe": {}}
    samples = {}
    for nfe in NFES[method]:
        x = generate(method, flow, num, nfe, seed=seed)
        samples[nfe] = x
        out["nfe"][nfe] = {"energy_distance": energy_distance(x, ref), "sliced_w2": sliced_wasserstein2(x, ref)}
    return out, samples, ref


def figure(path: Path, panels: dict, table: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(panels)
    cols = [("data", None)] + [(m, n) for m in NFES for n in NFES[m]]
    fig, axes = plt.subplots(len(datasets) + 1, len(cols), figsize=(1.9 * len(cols), 2.0 * (len(datasets) + 1)),
                             squeeze=False)
    for r, ds in enumerate(datasets):
        for c, (m, n) in enumerate(cols):
            ax = axes[r][c]
            pts = panels[ds]["data"] if m == "data" else panels[ds][m][n]
            ax.scatter(pts[:, 0], pts[:, 1], s=0.5, alpha=0.5, linewidths=0)
            ax.set_xlim(-2.8, 2.8)
            ax.set_ylim(-2.8, 2.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("data" if m == "data" else f"{m}\n{n} NFE", fontsize=7)
        axes[r][0].set_ylabel(ds, fontsize=8)
    for c, (m, n) in enumerate(cols):  # bottom row: mean energy distance per dataset
        ax = axes[-1][c]
        if m == "data":
            ax.axis("off")
            continue
        vals = [table[ds][m]["mean"][str(n)]["energy_distance"] for ds in datasets]
        ax.bar(range(len(vals)), vals, color=["C0", "C1"][: len(vals)])
        ax.set_xticks(range(len(vals)), [d[:5] for d in datasets], fontsize=6)
        ax.tick_params(labelsize=6)
    axes[-1][1].set_ylabel("energy dist.", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["checkerboard", "moons"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--set", action="append", default=[], help="extra config override for every run")
    ap.add_argument("--out", default="benchmarks/results/quality-toy.json")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results, panels = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for ds in args.datasets:
            results[ds], panels[ds] = {}, {}
            for method in NFES:
                runs = []
                for seed in range(args.seeds):
                    out, samples, ref = run_one(ds, method, seed, args.steps, args.num, Path(tmp), args.set)
                    runs.append(out)
                    if seed == 0:
                        panels[ds][method], panels[ds]["data"] = samples, ref
                    print(ds, method, seed, json.dumps(out["nfe"]), flush=True)
                mean = {str(n): {k: statistics.mean(r["nfe"][n][k] for r in runs) for k in ("energy_distance", "sliced_w2")}
                        for n in NFES[method]}
                results[ds][method] = {"runs": runs, "mean": mean,
                                       "train_seconds_mean": statistics.mean(r["train_seconds"] for r in runs)}
    summary = {}
    for ds, res in results.items():
        fm100 = res["flow_matching"]["mean"]["100"]["energy_distance"]
        summary[ds] = {"soflow_1nfe_over_meanflow_1nfe_energy": res["soflow"]["mean"]["1"]["energy_distance"]
                       / res["meanflow"]["mean"]["1"]["energy_distance"],
                       "soflow_1nfe_over_fm_100_energy": res["soflow"]["mean"]["1"]["energy_distance"] / fm100}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = {"config": vars(args), "commit": commit, "results": results, "summary": summary}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    figure(out.with_suffix(".png"), panels, results)
    print(json.dumps(summary, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
