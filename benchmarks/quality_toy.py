"""SoFlow, MeanFlow and flow matching at equal training steps on 2-D toys (checkerboard, moons).

Each (dataset, variant, seed) trains the toy2d preset's network for the same number of steps;
energy distance and sliced W2 to fresh data are measured at 1 and 2 NFE (SoFlow at 2 NFE with both
of its samplers, re-noising and chained; flow matching at 1, 2, 8 and 100 Euler steps).  MeanFlow
runs with both of its published recipes (ImageNet: 25 % of rows r != t, LN(-0.4, 1.0), p 1;
CIFAR-10: 75 % r != t, LN(-2, 2), p 0.75, c 1e-3) and SoFlow is compared with the better of the two.  Writes JSON and a figure.

    python benchmarks/quality_toy.py --steps 2000 --jobs 2 --out benchmarks/results/quality-toy.json

`--jobs N` trains N runs at once, one CPU thread each (the toy MLP is too small to use more).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from soflow.data import make_dataset
from soflow.eval import energy_distance, sliced_wasserstein2
from soflow.methods import generate
from soflow.train.config import load
from soflow.train.load import load_run
from soflow.train.loop import train

from record import git_commit, write_json  # benchmarks/record.py

# variant -> (method, config overrides, samplers); a sampler is "NFE" (the method's own rule) or "NFE-mode"
VARIANTS = {
    "soflow": ("soflow", [], ("1", "2", "2-chain")),
    "meanflow": ("meanflow", [], ("1", "2")),
    "meanflow_cifar": ("meanflow", ["meanflow.ratio_r_neq_t=0.75", "meanflow.time_mean=-2.0", "meanflow.time_std=2.0",
                                    "meanflow.p=0.75", "meanflow.c=0.001"], ("1", "2")),
    "flow_matching": ("flow_matching", [], ("1", "2", "8", "100")),
}


def run_one(dataset: str, variant: str, seed: int, steps: int, num: int, folder: Path, extra: list[str]):
    method, overrides, samplers = VARIANTS[variant]
    cfg = load("toy2d", [f"method={method}", f"data.name={dataset}", f"train.total_steps={steps}", f"train.seed={seed}",
                         f"train.log_every={steps}", f"train.checkpoint_every={steps}", "train.sample_nfe=[1]",
                         *overrides, *extra])
    run = folder / f"{dataset}-{variant}-{seed}"
    start = time.perf_counter()
    if train(cfg, run)["stopped"]:
        raise SystemExit(f"{run.name}: training stopped by a signal")
    seconds = time.perf_counter() - start
    _, flow, _ = load_run(run, warn=lambda m: None)
    ref = make_dataset(cfg.data).reference(num, seed=1000 + seed)
    out = {"train_seconds": seconds, "nfe": {}}
    samples = {}
    for key in samplers:
        nfe, _, mode = key.partition("-")
        x = generate(method, flow, num, int(nfe), mode=mode or None, seed=seed)
        samples[key] = x
        out["nfe"][key] = {"energy_distance": energy_distance(x, ref), "sliced_w2": sliced_wasserstein2(x, ref)}
    return out, samples, ref


def figure(path: Path, panels: dict, table: dict):
    """Top rows: seed-0 samples per dataset, variant and NFE.  Bottom: mean energy distance (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(panels)
    cols = [("data", None)] + [(v, n) for v in table[datasets[0]] for n in VARIANTS[v][2]]
    fig = plt.figure(figsize=(1.6 * len(cols), 1.7 * len(datasets) + 2.4))
    grid = fig.add_gridspec(len(datasets) + 1, len(cols), height_ratios=[1] * len(datasets) + [1.4])
    for r, ds in enumerate(datasets):
        for c, (v, n) in enumerate(cols):
            ax = fig.add_subplot(grid[r, c])
            pts = panels[ds]["data"] if v == "data" else panels[ds][v][n]
            ax.scatter(pts[:, 0], pts[:, 1], s=0.5, alpha=0.5, linewidths=0)
            ax.set(xlim=(-2.8, 2.8), ylim=(-2.8, 2.8), xticks=[], yticks=[], aspect="equal")
            if r == 0:
                ax.set_title("data" if v == "data" else f"{v}\nNFE {n}", fontsize=7)
        fig.axes[-len(cols)].set_ylabel(ds, fontsize=8)
    ax = fig.add_subplot(grid[-1, 1:])
    labels = [f"{v} {n}" for v, n in cols[1:]]
    width = 0.8 / len(datasets)
    for i, ds in enumerate(datasets):
        vals = [table[ds][v]["mean"][n]["energy_distance"] for v, n in cols[1:]]
        ax.bar([j + i * width for j in range(len(vals))], vals, width, label=ds)
    ax.set_yscale("log")
    ax.set_xticks([j + width * (len(datasets) - 1) / 2 for j in range(len(labels))], labels, fontsize=6, rotation=20)
    ax.set_ylabel("energy distance\n(mean of seeds)", fontsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["checkerboard", "moons"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--set", action="append", default=[], help="extra config override for every run")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once, one thread each")
    ap.add_argument("--out", default="benchmarks/results/quality-toy.json")
    args = ap.parse_args()
    tasks = [(ds, variant, seed) for ds in args.datasets for variant in args.variants for seed in range(args.seeds)]
    results, panels = {ds: {} for ds in args.datasets}, {ds: {} for ds in args.datasets}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        if args.jobs > 1:
            pool = stack.enter_context(ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                                           initializer=torch.set_num_threads, initargs=(1,)))
            futures = [pool.submit(run_one, *task, args.steps, args.num, Path(tmp), args.set) for task in tasks]
            outcomes = (f.result() for f in futures)
        else:
            outcomes = (run_one(*task, args.steps, args.num, Path(tmp), args.set) for task in tasks)
        runs = {}
        for (ds, variant, seed), (out, samples, ref) in zip(tasks, outcomes):
            runs.setdefault((ds, variant), []).append(out)
            if seed == 0:
                panels[ds][variant], panels[ds]["data"] = samples, ref
            print(ds, variant, seed, json.dumps(out["nfe"]), flush=True)
    for (ds, variant), rs in runs.items():
        mean = {key: {k: statistics.mean(r["nfe"][key][k] for r in rs) for k in ("energy_distance", "sliced_w2")}
                for key in VARIANTS[variant][2]}
        results[ds][variant] = {"runs": rs, "mean": mean, "train_seconds_mean": statistics.mean(r["train_seconds"] for r in rs)}
    summary = {}
    for ds, res in results.items():
        energy = {v: res[v]["mean"]["1"]["energy_distance"] for v in res}
        meanflows = [v for v in ("meanflow", "meanflow_cifar") if v in res]
        summary[ds] = {}
        if "soflow" in res and meanflows:
            best = min(meanflows, key=energy.get)
            summary[ds].update(best_meanflow=best, soflow_1nfe_over_meanflow_1nfe_energy=energy["soflow"] / energy[best])
        if "soflow" in res and "flow_matching" in res:
            summary[ds]["soflow_1nfe_over_fm_100_energy"] = (energy["soflow"]
                                                             / res["flow_matching"]["mean"]["100"]["energy_distance"])
    out = Path(args.out)
    write_json(out, {"config": vars(args), "commit": git_commit(), "results": results, "summary": summary})
    figure(out.with_suffix(".png"), panels, results)
    print(json.dumps(summary, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
