"""SoFlow, MeanFlow and flow matching at equal steps on Fashion-MNIST: the same network, steps and
batch for every method, each with its own recipe (RECIPES), two seeds each.

Scores come from the shipped classifier: Frechet distance of its penultimate features and its
accuracy on the requested class, for 1000 EMA samples (100 per class) against the real test split.
Every --eval-every steps the kept checkpoint is scored (SoFlow and MeanFlow at 1 and 2 NFE, flow
matching at its curve steps with guidance 3, the best scale of the 500-step recipe sweep); at the end flow matching is scored at 1, 2, 8 and 32
Euler steps for each guidance scale of --fm-guidance, and the best scale is reported per step count.
Writes JSON (all numbers, train time per run), a plot of FD against the training step, and one
sample grid per method at its best NFE.

    python benchmarks/quality_fmnist.py --steps 2000 --seeds 0 1 --out benchmarks/results/quality-fmnist.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from soflow import Pipeline
from soflow.data.images import fashion_mnist, to_float
from soflow.eval.run import eval_fmnist, fmnist_scores
from soflow.plots import image_grid
from soflow.run.config import load
from soflow.train.loop import train

from record import git_commit, write_json  # benchmarks/record.py

# method -> config overrides over the fmnist preset (whose lr 1e-3 and EMA 0.99 all three share:
# the recipe sweep, docs/benchmarks.md).  SoFlow trains with the preset's own recipe;
# MeanFlow with its CIFAR-10 recipe (75 % of rows r != t, LN(-2, 2), p 0.75, c 1e-3) and guidance at
# the same effective scale as SoFlow's (omega / (1 - kappa) = 2 on t <= 0.8); flow matching with
# label dropout for classifier-free guidance at sampling.
RECIPES = {
    "soflow": [],
    "meanflow": ["method=meanflow", "meanflow.ratio_r_neq_t=0.75", "meanflow.time_mean=-2.0",
                 "meanflow.time_std=2.0", "meanflow.p=0.75", "meanflow.c=0.001", "meanflow.omega=1.0",
                 "meanflow.kappa=0.5", "meanflow.t_max=0.8", "meanflow.cfg_drop_rate=0.1"],
    "flow_matching": ["method=flow_matching", "flow_matching.cfg_drop_rate=0.1"],
}
# (NFE, guidance scale; None: the model's own, built in by training) scored along the curve; flow
# matching's final table adds a sweep
CURVE = {"soflow": [(1, None), (2, None)], "meanflow": [(1, None), (2, None)], "flow_matching": [(8, 3.0), (32, 3.0)]}
FM_FINAL_STEPS = (1, 2, 8, 32)


def real_data_row(per_class: int = 100) -> dict:
    """The scores of real training images (the first per_class of each class): this metric's floor."""
    train_set = fashion_mnist(split="train")
    index = torch.cat([torch.nonzero(train_set.labels == c)[:per_class, 0] for c in range(10)])
    return fmnist_scores(to_float(train_set.images[index]), train_set.labels[index])


def train_run(method: str, seed: int, args, preset: str = "fmnist", recipe: list | None = None) -> tuple[Path, float]:
    """Train (or resume) run `method`-seed`seed` under args.runs: `preset` with `recipe` (default
    RECIPES[method]), args.steps steps, a checkpoint kept every args.eval_every; (folder, seconds)."""
    recipe = RECIPES[method] if recipe is None else recipe
    cfg = load(preset, [*recipe, f"train.total_steps={args.steps}", f"train.seed={seed}",
                        f"train.checkpoint_every={args.eval_every}", f"train.keep_every={args.eval_every}",
                        "train.sample_every=0", *args.set])
    run = Path(args.runs) / f"{method}-seed{seed}"
    start = time.perf_counter()
    if train(cfg, run)["stopped"]:
        raise SystemExit(f"{run}: training stopped by a signal; rerun the same command to resume")
    return run, time.perf_counter() - start


def curve(method: str, run: Path) -> list[dict]:
    """Scores of every kept checkpoint at the method's curve points."""
    points = []
    for ckpt in sorted((run / "checkpoints").glob("ckpt-*.pt")):
        for nfe, guidance in CURVE[method]:
            points.append(eval_fmnist(ckpt, nfe, guidance=guidance, warn=lambda m: None))
    return points


def final_scores(method: str, run: Path, fm_guidance: list[float]) -> dict:
    """{nfe: scores} at the last step; flow matching at each step count with its best guidance."""
    if method != "flow_matching":
        return {nfe: eval_fmnist(run, nfe) for nfe in (1, 2)}
    out = {}
    for steps in FM_FINAL_STEPS:
        tried = [eval_fmnist(run, steps, guidance=w) for w in fm_guidance]
        out[steps] = min(tried, key=lambda r: r["classifier_fd"]) | {"guidance_tried": {
            r["guidance"]: r["classifier_fd"] for r in tried}}
    return out


def summary(results: dict) -> dict:
    """Mean and per-seed classifier FD and accuracy for each method and NFE."""
    table = {}
    for method, runs in results["runs"].items():
        for nfe in runs[0]["final"]:
            fds = [r["final"][nfe]["classifier_fd"] for r in runs]
            accs = [r["final"][nfe]["class_accuracy"] for r in runs]
            table[f"{method} nfe{nfe}"] = {"fd_mean": statistics.mean(fds), "fd": fds,
                                           "accuracy_mean": statistics.mean(accs), "accuracy": accs,
                                           "train_seconds": [r["train_seconds"] for r in runs]}
    return table


def plot_curves(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, runs in results["runs"].items():
        for nfe, guidance in CURVE[method]:
            by_step: dict[int, list[float]] = {}
            for r in runs:
                for p in r["curve"]:
                    if p["nfe"] == nfe and p["guidance"] == guidance:
                        by_step.setdefault(p["step"], []).append(p["classifier_fd"])
            steps = sorted(by_step)
            label = f"{method}, {nfe} NFE" + (f", CFG {guidance:g}" if guidance != 1 else "")
            ax.plot(steps, [statistics.mean(by_step[s]) for s in steps], marker="o", label=label)
    ax.axhline(results["real_data"]["classifier_fd"], color="grey", linestyle=":", label="real images")
    ax.set(xlabel="training step", ylabel="classifier FD (mean of seeds)", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_grid(path: Path, method: str, run: Path, final: dict) -> None:
    """100 samples (a row per class) at the method's best NFE by FD."""
    nfe = min(final, key=lambda k: final[k]["classifier_fd"])
    pipe = Pipeline.from_pretrained(run, warn=lambda m: None)
    labels = torch.arange(10).repeat_interleave(10)
    image_grid(path, pipe.sample(100, nfe, labels=labels, guidance=final[nfe]["guidance"]), rows=10,
               title=f"{method}, {nfe} NFE")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--fm-guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    ap.add_argument("--set", action="append", default=[], help="extra override for every method")
    ap.add_argument("--runs", default="runs/quality-fmnist")
    ap.add_argument("--out", default="benchmarks/results/quality-fmnist.json")
    args = ap.parse_args()
    out = Path(args.out)
    results = {"real_data": real_data_row(), "runs": {}}
    for method in args.methods:
        for seed in args.seeds:
            run, seconds = train_run(method, seed, args)
            record = {"seed": seed, "train_seconds": seconds, "curve": curve(method, run),
                      "final": final_scores(method, run, args.fm_guidance)}
            results["runs"].setdefault(method, []).append(record)
            print(method, seed, json.dumps(record["final"]), flush=True)
            if seed == args.seeds[0]:
                sample_grid(out.with_name(f"{out.stem}-{method}.png"), method, run, record["final"])
            # written after every run, so a long benchmark that is stopped keeps what it measured
            results["summary"] = summary(results)
            write_json(out, {"config": vars(args), "recipes": RECIPES, "commit": git_commit(), "results": results})
    plot_curves(out.with_name(f"{out.stem}-curve.png"), results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
