"""A one-step model from a flow-matching model on Fashion-MNIST: what `train.init` buys.

Stages (each appends to the JSON; runs are kept under --runs and reused when finished):

    pretrain  flow matching on the fmnist network (quality_fmnist.py's recipe), checkpoints kept
              every --eval-every steps; scored at 8 Euler steps with guidance 1.5, 2 and 3.
    sweep     fine-tuning recipes (RECIPES) from the seed's flow-matching model, --steps each,
              scored at 1 and 2 NFE at every kept checkpoint.
    final     the chosen recipe for SoFlow (and MeanFlow, --methods) on every seed, the curve of
              FD against the fine-tuning step.

    python benchmarks/warmstart_fmnist.py pretrain --seeds 0 1 --steps 2000
    python benchmarks/warmstart_fmnist.py sweep --seeds 0 --steps 500
    python benchmarks/warmstart_fmnist.py final --seeds 0 1 --steps 1000 --recipe preset
    python benchmarks/warmstart_fmnist.py report --inputs results/warmstart-fmnist-*.json

`report` merges result files (one per process when runs went in parallel) into --out and draws
the curve of FD against the fine-tuning step beside the from-scratch and flow-matching scores of
quality_fmnist.py's results (--scratch).

Scores: soflow.eval.run.eval_fmnist (shipped classifier, 1000 EMA samples, 100 per class, against
the real test split).  Training seconds are wall time of each run as it happened; the docs say what
else shared the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from soflow.eval.run import eval_fmnist
from soflow.run.config import load
from soflow.train.loop import train

from quality_fmnist import RECIPES as FROM_SCRATCH  # benchmarks/quality_fmnist.py
from record import git_commit, write_json  # benchmarks/record.py

# Fine-tuning recipes: overrides over the fmnist-from-fm preset (the fmnist recipe, K = the
# fine-tuning length, so r(k, K) runs its whole schedule during fine-tuning).
RECIPES = {
    "preset": [],
    "lr3e-4": ["train.lr=0.0003"],
    "r-const": ["objective.schedule=const", "objective.r_init=0.01", "objective.r_end=0.01"],
    "vlr0.25": ["objective.velocity_loss_ratio=0.25"],
    "vlr0.75": ["objective.velocity_loss_ratio=0.75"],
    "meanflow": FROM_SCRATCH["meanflow"],
}
FM_GUIDANCE = (1.5, 2.0, 3.0)


def run_dir(args, name: str, seed: int) -> Path:
    return Path(args.runs) / f"{name}-seed{seed}"


def timed_train(cfg, run: Path) -> float:
    """Train (or finish) the run; the wall seconds of this call (0 when it was already finished)."""
    start = time.perf_counter()
    if train(cfg, run)["stopped"]:
        raise SystemExit(f"{run}: stopped by a signal; rerun the same command to resume")
    return time.perf_counter() - start


def pretrain(args, seed: int) -> dict:
    run = run_dir(args, "fm", seed)
    cfg = load("fmnist", [*FROM_SCRATCH["flow_matching"], f"train.total_steps={args.steps}", f"train.seed={seed}",
                          f"train.checkpoint_every={args.eval_every}", f"train.keep_every={args.eval_every}",
                          "train.sample_every=0", *args.set])
    seconds = timed_train(cfg, run)
    scores = [eval_fmnist(ckpt, 8, guidance=w, warn=lambda m: None)
              for ckpt in sorted((run / "checkpoints").glob("ckpt-*.pt")) for w in FM_GUIDANCE]
    return {"seed": seed, "steps": args.steps, "train_seconds": seconds, "scores": scores}


def fine_tune(args, recipe: str, seed: int, source_step: int | None) -> dict:
    fm = run_dir(args, "fm", seed)
    source = fm / "checkpoints" / f"ckpt-{source_step:08d}.pt" if source_step else fm
    name = recipe if not source_step else f"{recipe}-from{source_step}"
    run = run_dir(args, name, seed)
    cfg = load("fmnist-from-fm", [*RECIPES[recipe], f"train.init={source}", f"train.total_steps={args.steps}",
                                  f"train.seed={seed}", f"train.checkpoint_every={args.eval_every}",
                                  f"train.keep_every={args.eval_every}", "train.sample_every=0", *args.set])
    seconds = timed_train(cfg, run)
    curve = [eval_fmnist(ckpt, nfe, warn=lambda m: None)
             for ckpt in sorted((run / "checkpoints").glob("ckpt-*.pt")) for nfe in (1, 2)]
    print(recipe, seed, json.dumps([(p["step"], p["nfe"], round(p["classifier_fd"], 2),
                                     round(p["class_accuracy"], 3)) for p in curve]), flush=True)
    return {"recipe": recipe, "seed": seed, "source_step": source_step, "steps": args.steps,
            "train_seconds": seconds, "curve": curve}


def merged(paths: list[str]) -> dict:
    """The stages of several result files in one document (later files win on equal keys)."""
    out: dict = {}
    for path in paths:
        doc = json.loads(Path(path).read_text())
        for stage in ("pretrain", "sweep", "final"):
            out.setdefault(stage, {}).update(doc.get(stage, {}))
    return out


def plot(path: Path, results: dict, scratch: dict) -> None:
    """FD at 1 NFE against fine-tuning steps (mean of seeds), with the from-scratch SoFlow at 2000
    steps and flow matching's best multi-step score as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for stage in ("final", "sweep"):
        by_recipe: dict[str, dict[int, list[float]]] = {}
        for record in results.get(stage, {}).values():
            for p in record["curve"]:
                if p["nfe"] == 1:
                    by_recipe.setdefault(record["recipe"], {}).setdefault(p["step"], []).append(p["classifier_fd"])
        for recipe, by_step in by_recipe.items():
            steps = sorted(by_step)
            ax.plot(steps, [sum(by_step[k]) / len(by_step[k]) for k in steps], marker="o",
                    label=f"{recipe} from FM ({stage}), 1 NFE")
    for label, value, style in scratch_lines(scratch):
        ax.axhline(value, linestyle=style, color="grey", label=label)
    ax.set(xlabel="fine-tuning step", ylabel="classifier FD (mean of seeds)", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scratch_lines(scratch: dict) -> list[tuple[str, float, str]]:
    """(label, FD, line style) of the from-scratch references in quality_fmnist.py's results."""
    if not scratch:
        return []
    summary = scratch["results"]["summary"]
    fm_best = min(v["fd_mean"] for k, v in summary.items() if k.startswith("flow_matching") and k != "flow_matching nfe1")
    return [("SoFlow from scratch, 2000 steps, 1 NFE", summary["soflow nfe1"]["fd_mean"], "--"),
            ("flow matching 2000 steps, best multi-step", fm_best, ":")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("pretrain", "sweep", "final", "report"))
    ap.add_argument("--inputs", nargs="+", default=[], help="report: result files to merge")
    ap.add_argument("--scratch", default="results/quality-fmnist.json", help="report: quality_fmnist.py's results")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--recipes", nargs="+", default=["preset", "lr3e-4", "r-const", "vlr0.25"], choices=list(RECIPES))
    ap.add_argument("--source-step", type=int, default=None, help="start from this kept FM checkpoint (default: the last)")
    ap.add_argument("--set", action="append", default=[], help="extra override for every run (e.g. train.threads=1)")
    ap.add_argument("--runs", default="runs/warmstart-fmnist")
    ap.add_argument("--out", default="benchmarks/results/warmstart-fmnist.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.stage == "report":
        results = merged(args.inputs)
        scratch = json.loads(Path(args.scratch).read_text()) if Path(args.scratch).is_file() else {}
        write_json(out, {**results, "recipes": RECIPES, "inputs": args.inputs, "commit": git_commit()})
        plot(out.with_name(out.stem + "-curve.png"), results, scratch)
        print(f"wrote {out}")
        return
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("recipes", RECIPES)
    for seed in args.seeds:
        if args.stage == "pretrain":
            results.setdefault("pretrain", {})[str(seed)] = pretrain(args, seed)
        else:
            for recipe in args.recipes:
                record = fine_tune(args, recipe, seed, args.source_step)
                key = f"{record['recipe']}-from{args.source_step or 'last'}-seed{seed}"
                results.setdefault(args.stage, {})[key] = record
                write_json(out, {**results, "commit": git_commit()})
        write_json(out, {**results, "commit": git_commit()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
