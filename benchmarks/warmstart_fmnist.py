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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("pretrain", "sweep", "final"))
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
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("recipes", RECIPES)
    for seed in args.seeds:
        if args.stage == "pretrain":
            results.setdefault("pretrain", {})[str(seed)] = pretrain(args, seed)
        else:
            for recipe in args.recipes:
                record = fine_tune(args, recipe, seed, args.source_step)
                results.setdefault(args.stage, {})[f"{record['recipe']}-from{args.source_step or 'last'}-seed{seed}"] = record
                write_json(out, {**results, "commit": git_commit()})
        write_json(out, {**results, "commit": git_commit()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
