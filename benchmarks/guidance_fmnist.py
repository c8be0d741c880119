"""One model for every guidance scale against models trained at one scale, on Fashion-MNIST.

Trains, at equal steps and for each seed, the fmnist network three ways (VARIANTS): the
`fmnist-any-guidance` preset (w drawn per row on [1, 4], w a network input) and fixed-scale SoFlow
at w = 2 (the `fmnist` preset) and w = 3.  Scores with the shipped classifier (quality_fmnist.py's
scoring: Frechet distance of its features to the test split, accuracy on the requested class,
--per-class EMA samples of each class) at 1 NFE: the conditioned model at every scale of --scales,
the fixed models at their own scale.  Then checks the targets of the guidance issue:

    fd_ratio_w2, fd_ratio_w3   conditioned FD / fixed FD at w = 2 and w = 3 (target <= 1.1)
    best_fd_vs_best_fixed      min over w of the conditioned FD <= min of the two fixed FDs
    accuracy_rises_to_3        class accuracy increases with w from 1 to 3
    step_time_ratio            conditioned / fixed w = 2 training seconds (<= 1.1; benchmarks/cost.py
                               times the steps themselves)

Writes JSON (all numbers, seed means, the targets) and a plot of FD and accuracy against w.

    python benchmarks/guidance_fmnist.py --steps 2000 --seeds 0 1 --out benchmarks/results/guidance-fmnist.json
    python benchmarks/guidance_fmnist.py --steps 4 --seeds 0 --per-class 2 --runs /tmp/g --out /tmp/g.json  # smoke

Seeds may run in separate processes (--seeds 0 --out a.json, --seeds 1 --out b.json); then
`--combine a.json b.json --out ...` joins their runs and computes the means, targets and plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from soflow.eval.run import eval_fmnist

from quality_fmnist import real_data_row, train_run  # benchmarks/quality_fmnist.py
from record import git_commit, write_json  # benchmarks/record.py

# name -> (preset, overrides, scales scored: None = every scale of --scales)
VARIANTS = {
    "any": ("fmnist-any-guidance", [], None),
    "w2": ("fmnist", [], [2.0]),
    "w3": ("fmnist", ["objective.cfg_scale=3.0"], [3.0]),
}


def scores(run: Path, scales: list[float], per_class: int) -> dict[float, dict]:
    """{w: eval_fmnist scores} at 1 NFE."""
    return {w: eval_fmnist(run, 1, per_class, guidance=w, warn=lambda m: None) for w in scales}


def seed_means(records: list[dict]) -> dict[float, dict]:
    """{w: {fd_mean, fd, accuracy_mean, accuracy}} over the seeds of one variant."""
    out = {}
    for w in records[0]["scores"]:
        fds = [r["scores"][w]["classifier_fd"] for r in records]
        accs = [r["scores"][w]["class_accuracy"] for r in records]
        out[w] = {"fd_mean": statistics.mean(fds), "fd": fds, "accuracy_mean": statistics.mean(accs),
                  "accuracy": accs}
    return out


def targets(means: dict, seconds: dict) -> dict:
    """The issue's targets from the seed means (met: True / False, with the numbers)."""
    any_, w2, w3 = means["any"], means["w2"][2.0], means["w3"][3.0]
    best_any = min(v["fd_mean"] for v in any_.values())
    accs = [any_[w]["accuracy_mean"] for w in sorted(any_) if 1.0 <= w <= 3.0]
    ratio2, ratio3 = any_[2.0]["fd_mean"] / w2["fd_mean"], any_[3.0]["fd_mean"] / w3["fd_mean"]
    step_ratio = statistics.mean(seconds["any"]) / statistics.mean(seconds["w2"])
    return {
        "fd_ratio_w2": {"value": ratio2, "met": ratio2 <= 1.1},
        "fd_ratio_w3": {"value": ratio3, "met": ratio3 <= 1.1},
        "best_fd_vs_best_fixed": {"conditioned": best_any, "fixed": min(w2["fd_mean"], w3["fd_mean"]),
                                  "met": best_any <= min(w2["fd_mean"], w3["fd_mean"])},
        "accuracy_rises_to_3": {"accuracy": accs, "met": all(a < b for a, b in zip(accs, accs[1:]))},
        "step_time_ratio": {"value": step_ratio, "met": step_ratio <= 1.1},
    }


def plot(path: Path, means: dict, real: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "fd_mean", "classifier FD (1 NFE)"), (axes[1], "accuracy_mean", "class accuracy")):
        ws = sorted(means["any"])
        ax.plot(ws, [means["any"][w][key] for w in ws], marker="o", label="one model, w as input")
        for name, marker in (("w2", "s"), ("w3", "^")):
            (w, v), = means[name].items()
            ax.plot([w], [v[key]], marker=marker, linestyle="none", markersize=9, label=f"trained at w = {w:g}")
        ax.axhline(real["classifier_fd" if key == "fd_mean" else "class_accuracy"], color="grey", linestyle=":",
                   label="real images")
        ax.set(xlabel="guidance scale w", ylabel=label)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=None, help="checkpoint cadence (default: --steps)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    ap.add_argument("--per-class", type=int, default=100, help="samples of each class per score")
    ap.add_argument("--set", action="append", default=[], help="extra override for every variant")
    ap.add_argument("--runs", default="runs/guidance-fmnist")
    ap.add_argument("--out", default="benchmarks/results/guidance-fmnist.json")
    ap.add_argument("--combine", nargs="+", help="join the runs of these result files (one per seed) instead of training")
    args = ap.parse_args()
    if args.combine:
        return combine(args.combine, Path(args.out))
    args.eval_every = args.eval_every or args.steps
    if not {2.0, 3.0} <= set(args.scales):
        ap.error("--scales must include 2 and 3 (the fixed models' scales)")
    out = Path(args.out)
    results = {"real_data": real_data_row(args.per_class), "runs": {}}
    seconds = {}
    for name, (preset, overrides, scales) in VARIANTS.items():
        for seed in args.seeds:
            run, secs = train_run(f"soflow-{name}", seed, args, preset=preset, recipe=overrides)
            record = {"seed": seed, "train_seconds": secs, "scores": scores(run, scales or args.scales, args.per_class)}
            results["runs"].setdefault(name, []).append(record)
            seconds.setdefault(name, []).append(secs)
            print(name, seed, json.dumps(record["scores"]), flush=True)
            # written after every run, so a long benchmark that is stopped keeps what it measured
            write_json(out, {"config": vars(args), "variants": VARIANTS, "commit": git_commit(), "results": results})
    finish(out, {"config": vars(args), "variants": VARIANTS, "commit": git_commit(), "results": results})


def finish(out: Path, doc: dict) -> None:
    """Seed means, targets and the plot of a document whose results hold every run."""
    results = doc["results"]
    means = {name: seed_means(records) for name, records in results["runs"].items()}
    seconds = {name: [r["train_seconds"] for r in records] for name, records in results["runs"].items()}
    results["means"], results["targets"] = means, targets(means, seconds)
    write_json(out, doc)
    plot(out.with_name(f"{out.stem}.png"), means, results["real_data"])
    print(json.dumps(results["targets"], indent=1))
    print(f"wrote {out}")


def combine(paths: list[str], out: Path) -> None:
    """One document from result files of the same settings that ran different seeds."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    runs: dict[str, list] = {}
    for doc in docs:
        for name, records in doc["results"]["runs"].items():
            runs.setdefault(name, []).extend(records)
    # JSON keys are strings: scores keyed by w come back as "2.0"
    for records in runs.values():
        for r in records:
            r["scores"] = {float(w): v for w, v in r["scores"].items()}
    config = {**docs[0]["config"], "seeds": sorted(r["seed"] for r in runs["any"]), "combined": paths}
    finish(out, {"config": config, "variants": VARIANTS, "commit": docs[0]["commit"],
                 "results": {"real_data": docs[0]["results"]["real_data"], "runs": runs}})


if __name__ == "__main__":
    main()
