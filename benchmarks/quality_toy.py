"""SoFlow, MeanFlow and flow matching at equal training steps on 2-D toys.

Each (dataset, variant, seed) trains the toy2d preset's network for the same number of steps;
energy distance and sliced W2 to fresh data are measured at 1 and 2 NFE (SoFlow at 2 NFE with both
of its samplers, re-noising and chained; flow matching at 1, 2, 8 and 100 Euler steps).  MeanFlow
runs with both of its published recipes (ImageNet: 25 % of rows r != t, LN(-0.4, 1.0), p 1;
CIFAR-10: 75 % r != t, LN(-2, 2), p 0.75, c 1e-3) and SoFlow is compared with the better of the two.
Writes JSON and a figure.

    python benchmarks/quality_toy.py --steps 2000 --jobs 2 --out benchmarks/results/quality-toy.json

`--datasets family` scores on the multi-scale validation family (soflow.data.toy_family: tiny and
wide Gaussians, rings with and without a gap, a spiral arm, holes, 0.01-wide structures, a
three-scale cloud) and the summary adds, per dataset and averaged over the family, each method's
energy distance over flow matching's at 100 Euler steps:

    python benchmarks/quality_toy.py --datasets family --seeds 4 --variants soflow meanflow flow_matching \
        --cache /tmp/toy-runs --out benchmarks/results/quality-toy-family.json

`--variants` also takes the sweep candidates of SWEEP (how the toy defaults were chosen on the
family, benchmarks/results/sweep-toy-family.json).  `--cache DIR` keeps every finished run (scores
and seed-0 samples) under a hash of its resolved config, dataset, seed and sample count, and reuses
it, so a longer table can build on the sweep's seeds and an interrupted run resumes.
`--jobs N` trains N runs at once, one CPU thread each (the toy MLP is too small to use more).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from soflow.data import make_dataset
from soflow.data.toy_family import FAMILY
from soflow.eval import energy_distance, sliced_wasserstein2
from soflow.methods import METHODS
from soflow.run.config import load
from soflow.run.load import load_run
from soflow.train.loop import train

from record import git_commit, write_json  # benchmarks/record.py

# variant -> (method, config overrides, samplers); a sampler is "NFE" (the method's own rule) or "NFE-mode"
VARIANTS = {
    "soflow": ("soflow", [], ("1", "2-renoise", "2-chain")),
    "meanflow": ("meanflow", [], ("1", "2")),
    "meanflow_cifar": ("meanflow", ["meanflow.ratio_r_neq_t=0.75", "meanflow.time_mean=-2.0", "meanflow.time_std=2.0",
                                    "meanflow.p=0.75", "meanflow.c=0.001"], ("1", "2")),
    "flow_matching": ("flow_matching", [], ("1", "2", "8", "100")),
}
MEANFLOWS = ("meanflow", "meanflow_cifar")
# No toy-specific MeanFlow overrides: on the family the ImageNet recipe (the MeanFlowLoss defaults) had the
# lower mean 1-NFE ratio to flow matching's 100 steps (12.1x, two seeds, against 14.5x for the CIFAR-10
# recipe, one seed) and the far lower 2-NFE one (3.6x against 16.7x); sweep-toy-family.json.

# Sweep candidates for the toy defaults, scored by their mean over the family (2000 steps, batch 512,
# the toy2d MLP).  soflow_* differ from the toy2d preset (which is what "soflow" runs) only where named.
SOFLOW_IMAGENET = ["objective.velocity_loss_ratio=0.75", "objective.time_mean=[-0.2,-1.0,0.2]",
                   "objective.time_std=[1.0,0.8,0.8]", "objective.r_init=0.1", "objective.r_end=0.002"]
SWEEP = {
    "soflow_preset": VARIANTS["soflow"],
    "soflow_imagenet": ("soflow", SOFLOW_IMAGENET, VARIANTS["soflow"][2]),
    "meanflow_imagenet": VARIANTS["meanflow"],
    "meanflow_cifar": VARIANTS["meanflow_cifar"],
    "flow_matching_preset": VARIANTS["flow_matching"],
}
# MeanFlow candidates from the public rectified-flow-pytorch 0.14 settings (its MeanFlow: the whole batch
# r != t on half of the steps, adaptive weight p 0.5 on the per-element mean error, lr 3e-4, gradient
# norm clipped to 0.5), all together and one at a time on the ImageNet recipe (soflow's defaults).
MEANFLOW_PUBLIC = {
    "split": ["meanflow.r_neq_t_split=steps", "meanflow.ratio_r_neq_t=0.5"],
    "weight": ["meanflow.p=0.5", "meanflow.reduction=mean"],
    "optim": ["train.lr=0.0003", "train.grad_clip=0.5"],
}
SWEEP.update({f"meanflow_{name}": ("meanflow", overrides, VARIANTS["meanflow"][2])
              for name, overrides in MEANFLOW_PUBLIC.items()})
SWEEP["meanflow_public"] = ("meanflow", [o for part in MEANFLOW_PUBLIC.values() for o in part], VARIANTS["meanflow"][2])
ALL_VARIANTS = {**VARIANTS, **{k: v for k, v in SWEEP.items() if k not in VARIANTS}}


def run_one(dataset: str, variant: str, seed: int, steps: int, num: int, folder: Path, extra: list[str],
            cache: str | None = None):
    method, overrides, samplers = ALL_VARIANTS[variant]
    cfg = load("toy2d", [f"method={method}", f"data.name={dataset}", f"train.total_steps={steps}", f"train.seed={seed}",
                         f"train.log_every={steps}", f"train.checkpoint_every={steps}", "train.sample_nfe=[1]",
                         *overrides, *extra])
    signature = json.dumps([cfg.to_dict(), num, samplers], sort_keys=True, default=str)
    key = hashlib.sha1(signature.encode()).hexdigest()[:16]
    cached = Path(cache) / f"{dataset}-{variant}-{seed}-{key}.pt" if cache else None
    if cached is not None:
        hits = sorted(Path(cache).glob(f"{dataset}-*-{seed}-{key}.pt"))  # the same config under another name
        if hits:
            return torch.load(hits[0], weights_only=True)  # tensors, dicts and numbers only: no code runs
    run = folder / f"{dataset}-{variant}-{seed}"
    start = time.perf_counter()
    if train(cfg, run)["stopped"]:
        raise SystemExit(f"{run.name}: training stopped by a signal")
    seconds = time.perf_counter() - start
    _, flow, _ = load_run(run, warn=lambda m: None)
    ref = make_dataset(cfg.data).reference(num, seed=1000 + seed)
    out = {"train_seconds": seconds, "nfe": {}}
    samples = {}
    for key_ in samplers:
        nfe, _, mode = key_.partition("-")
        x = METHODS[method].sample(flow, num, int(nfe), mode=mode or None, seed=seed)
        samples[key_] = x
        out["nfe"][key_] = {"energy_distance": energy_distance(x, ref), "sliced_w2": sliced_wasserstein2(x, ref)}
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save((out, samples, ref), cached.with_suffix(".tmp"))
        cached.with_suffix(".tmp").replace(cached)
    return out, samples, ref


def figure(path: Path, panels: dict, table: dict):
    """Top rows: seed-0 samples per dataset, variant and NFE.  Bottom: mean energy distance (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(panels)
    cols = [("data", None)] + [(v, n) for v in table[datasets[0]] for n in ALL_VARIANTS[v][2]]
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
    ax.legend(fontsize=6, ncol=max(1, len(datasets) // 4))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(results: dict) -> dict:
    """Per dataset: SoFlow against the better MeanFlow recipe, and every variant and sampler over
    flow matching's 100 Euler steps (energy distance).  Over several datasets: the mean of those
    ratios, the mean energy, and the targets (SoFlow 1-NFE within 1.5x of flow matching 100 on
    the mean, below the better MeanFlow's 1-NFE on every dataset, 2 NFE no worse than 1)."""
    summary = {}
    for ds, res in results.items():
        energy = {v: res[v]["mean"]["1"]["energy_distance"] for v in res}
        meanflows = [v for v in MEANFLOWS if v in res]
        summary[ds] = {}
        if "soflow" in res and meanflows:
            best = min(meanflows, key=energy.get)
            summary[ds].update(best_meanflow=best,
                               soflow_1nfe_over_meanflow_1nfe_energy=energy["soflow"] / energy[best])
        fm = next((v for v in ("flow_matching", "flow_matching_preset") if v in res), None)
        if fm is not None:
            fm100 = res[fm]["mean"]["100"]["energy_distance"]
            if "soflow" in res:
                summary[ds]["soflow_1nfe_over_fm_100_energy"] = energy["soflow"] / fm100
            summary[ds]["over_fm_100"] = {f"{v} {n}": res[v]["mean"][n]["energy_distance"] / fm100
                                          for v in res for n in res[v]["mean"]}
    if len(results) < 2:
        return summary
    datasets = list(results)
    keys = set.intersection(*[set(summary[ds].get("over_fm_100", {})) for ds in datasets])
    energies = {f"{v} {n}": [results[ds][v]["mean"][n]["energy_distance"] for ds in datasets]
                for v in results[datasets[0]] for n in results[datasets[0]][v]["mean"]
                if all(v in results[ds] for ds in datasets)}
    mean = {"energy": {k: statistics.mean(e) for k, e in energies.items()}}
    if keys:
        mean["over_fm_100"] = {k: statistics.mean(summary[ds]["over_fm_100"][k] for ds in datasets)
                               for k in sorted(keys)}
    summary["mean_over_datasets"] = mean
    over = mean.get("over_fm_100", {})
    meanflows = [v for v in MEANFLOWS if f"{v} 1" in over]
    if "soflow 1" in over and meanflows:
        best = min(meanflows, key=lambda v: over[f"{v} 1"])
        # a merged earlier file may lack a sampler (older files named re-noising "2"): skip what is absent
        per_ds = {ds: {f"{v} {n}": results[ds][v]["mean"][n]["energy_distance"]
                       for v, n in (("soflow", "1"), (best, "1"), ("soflow", "2-renoise"), ("soflow", "2-chain"))
                       if n in results[ds][v]["mean"]}
                  for ds in datasets}
        two = [k for k in ("soflow 2-renoise", "soflow 2-chain") if all(k in per_ds[ds] for ds in datasets)]
        summary["targets"] = {
            "best_meanflow": best,
            "soflow_1nfe_over_fm_100_mean": over["soflow 1"],
            "soflow_1nfe_within_1.5x_fm_100": over["soflow 1"] <= 1.5,
            "soflow_1nfe_below_meanflow_1nfe_on": [ds for ds in datasets
                                                   if per_ds[ds]["soflow 1"] < per_ds[ds][f"{best} 1"]],
            "soflow_1nfe_not_below_meanflow_1nfe_on": [ds for ds in datasets
                                                       if per_ds[ds]["soflow 1"] >= per_ds[ds][f"{best} 1"]],
            "soflow_2nfe_over_1nfe_mean": {k: statistics.mean(per_ds[ds][k] / per_ds[ds]["soflow 1"] for ds in datasets)
                                           for k in two},
            "soflow_2nfe_worse_than_1nfe_on": {k: [ds for ds in datasets if per_ds[ds][k] > per_ds[ds]["soflow 1"]]
                                               for k in two},
        }
    return summary


def seed_mean(runs: list[dict]) -> dict:
    """One variant on one dataset: its runs (seeds 0, 1, ...) and their mean per sampler."""
    mean = {key: {k: statistics.mean(r["nfe"][key][k] for r in runs) for k in ("energy_distance", "sliced_w2")}
            for key in runs[0]["nfe"]}
    return {"runs": runs, "mean": mean, "train_seconds_mean": statistics.mean(r["train_seconds"] for r in runs)}


def merge_results(results: dict, args, path: Path) -> None:
    """Add to `results` the variants of an earlier results file that did not run here, over the seeds
    run here (a run is a function of config, dataset and seed, so an unchanged variant's numbers
    carry over)."""
    earlier = json.loads(path.read_text())
    same = {k: earlier["config"].get(k) == getattr(args, k) for k in ("steps", "num")}
    same["seeds"] = earlier["config"].get("seeds", 0) >= args.seeds
    if not all(same.values()):
        raise SystemExit(f"--merge {path}: made with other {', '.join(k for k, ok in same.items() if not ok)}")
    for ds, res in results.items():
        if ds not in earlier["results"]:
            raise SystemExit(f"--merge {path}: has no results for {ds}")
        for variant, numbers in earlier["results"][ds].items():
            if variant not in res and len(numbers["runs"]) >= args.seeds:
                res[variant] = seed_mean(numbers["runs"][:args.seeds])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["checkerboard", "moons"],
                    help="toy names, or 'family' for the validation family")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(ALL_VARIANTS))
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--set", action="append", default=[], help="extra config override for every run")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once, one thread each")
    ap.add_argument("--cache", help="folder keeping finished runs for reuse (see above)")
    ap.add_argument("--merge", help="results JSON of an earlier run of this script at the same steps and sample "
                                    "count and at least as many seeds: its variants that did not run here join the "
                                    "table and summary, over the seeds run here")
    ap.add_argument("--no-figure", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/quality-toy.json")
    args = ap.parse_args()
    args.datasets = [name for ds in args.datasets for name in (FAMILY if ds == "family" else [ds])]
    tasks = [(ds, variant, seed) for ds in args.datasets for variant in args.variants for seed in range(args.seeds)]
    results, panels = {ds: {} for ds in args.datasets}, {ds: {} for ds in args.datasets}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        run_args = (args.steps, args.num, Path(tmp), args.set, args.cache)
        if args.jobs > 1:
            pool = stack.enter_context(ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                                           initializer=torch.set_num_threads, initargs=(1,)))
            futures = [pool.submit(run_one, *task, *run_args) for task in tasks]
            outcomes = (f.result() for f in futures)
        else:
            outcomes = (run_one(*task, *run_args) for task in tasks)
        runs = {}
        for (ds, variant, seed), (out, samples, ref) in zip(tasks, outcomes):
            runs.setdefault((ds, variant), []).append(out)
            if seed == 0:
                panels[ds][variant], panels[ds]["data"] = samples, ref
            print(ds, variant, seed, f"{out['train_seconds']:.0f}s", json.dumps(out["nfe"]), flush=True)
    for (ds, variant), rs in runs.items():
        results[ds][variant] = seed_mean(rs)
    figured = {ds: dict(res) for ds, res in results.items()}  # the figure shows the variants run here
    if args.merge:
        merge_results(results, args, Path(args.merge))
    summary = summarize(results)
    out = Path(args.out)
    write_json(out, {"config": vars(args), "commit": git_commit(),
                     "variants": {v: {"method": ALL_VARIANTS[v][0], "overrides": ALL_VARIANTS[v][1]}
                                  for v in args.variants},
                     "results": results, "summary": summary})
    if not args.no_figure:
        figure(out.with_suffix(".png"), panels, figured)
    print(json.dumps(summary.get("mean_over_datasets", summary), indent=1))
    print(json.dumps(summary.get("targets", {}), indent=1))
    print(f"wrote {out}" + ("" if args.no_figure else f" and {out.with_suffix('.png')}"))


if __name__ == "__main__":
    main()
