"""Recipe sweep on Fashion-MNIST: train named settings of SoFlow, MeanFlow and flow matching on the
`fmnist` preset with config overrides, score each with the shipped classifier (Frechet distance and
class accuracy, 1000 samples against the test split) and append every result to a JSON list as
soon as it is measured.

    python benchmarks/sweep_fmnist.py --steps 1000 --settings soflow-u32 fm-u32 --eval-at 500 1000
    python benchmarks/sweep_fmnist.py --steps 20 --time-only --settings soflow-dit4 soflow-u32

`--eval-at` scores the same run at several steps (the run stops there, is scored from its latest
checkpoint's EMA weights and resumes), so one run gives a quality-versus-steps curve; the middle
time schedule r(k, K) of SoFlow runs over the full --steps.  `--time-only` trains --steps steps and
records only seconds per step (measured between the optimizer steps, set-up excluded).
`--rescore RUN ...` scores existing run folders' latest checkpoints.  `--weights ema online` scores both weight sets (an EMA lags a short run by about 1 / (1 - decay) steps).
Every process runs on one intra-op thread (train.threads=1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from soflow.eval.run import fmnist_scores
from soflow.methods import METHODS
from soflow.run.config import load
from soflow.run.load import load_run
from soflow.train.loop import train

sys.path.insert(0, str(Path(__file__).parent))
from record import git_commit  # noqa: E402  benchmarks/record.py

# --------------------------------------------------------------------------- networks

# model overrides per network name; the U-Nets are EDM SongUNets at 28x28 (levels 28, 14, 7), with widths
# whose skip concatenations divide into GroupNorm's 32 groups
NETS = {
    "dit4": [],  # the preset: DiT patch 4, hidden 128, depth 6 (49 tokens)
    "dit2": ["model.net_args.patch_size=2"],  # 196 tokens
    "dit2s": ["model.net_args.patch_size=2", "model.net_args.depth=4"],
    "u32": ["model.net=unet-small", "model.net_args={model_channels: 32, channel_mult: [1, 2, 2], num_blocks: 1, "
            "attn_resolutions: [7]}"],
    "u32w": ["model.net=unet-small", "model.net_args={model_channels: 32, channel_mult: [2, 2, 2], num_blocks: 1, "
             "attn_resolutions: [7]}"],
    "u64": ["model.net=unet-small", "model.net_args={model_channels: 64, channel_mult: [1, 2, 2], num_blocks: 1, "
            "attn_resolutions: [7]}"],
    "u32b2": ["model.net=unet-small", "model.net_args={model_channels: 32, channel_mult: [1, 2, 2], num_blocks: 2, "
              "attn_resolutions: [7]}"],
}

# --------------------------------------------------------------------------- methods

# SoFlow: the preset's objective (p 1, eps 0.01, velocity ratio 0.5, r 0.2 -> 0.01, guidance w 2, m 0.5)
SOFLOW = ["method=soflow"]
# the authors' CIFAR-10 objective (pure consistency, p 0.75, eps 1e-3, r 1 -> 3e-4, their time means)
SOFLOW_CIFAR = ["method=soflow", "objective.velocity_loss_ratio=0.0", "objective.p=0.75", "objective.eps=0.001",
                "objective.r_init=1.0", "objective.r_end=0.0003125", "objective.time_mean=[-0.9, -4.0, -0.9]",
                "objective.time_std=[1.6, 1.6, 1.6]"]
# MeanFlow, CIFAR-10 settings (r != t on 75 %, LN(-2, 2), p 0.75, c 1e-3) with the benchmark's guidance
MF_GUIDE = ["meanflow.omega=1.0", "meanflow.kappa=0.5", "meanflow.t_max=0.8", "meanflow.cfg_drop_rate=0.1"]
MEANFLOW_CIFAR = ["method=meanflow", "meanflow.ratio_r_neq_t=0.75", "meanflow.time_mean=-2.0",
                  "meanflow.time_std=2.0", "meanflow.p=0.75", "meanflow.c=0.001", *MF_GUIDE]
# MeanFlow, ImageNet settings (r != t on 25 %, LN(-0.4, 1), p 1)
MEANFLOW_IN = ["method=meanflow", "meanflow.ratio_r_neq_t=0.25", "meanflow.time_mean=-0.4", "meanflow.time_std=1.0",
               "meanflow.p=1.0", "meanflow.c=0.001", *MF_GUIDE]
FM = ["method=flow_matching", "flow_matching.cfg_drop_rate=0.1"]
# faster learning for short runs: lr 1e-3 (every method)
FAST = ["train.lr=0.001"]

# how each method is scored: (NFEs, sampling guidance scales)
SCORING = {"soflow": ((1, 2), (1.0,)), "meanflow": ((1, 2), (1.0,)), "flow_matching": ((4, 8, 16), (1.5, 2.0, 3.0))}

SETTINGS = {
    # speed probes and baselines on each network
    **{f"soflow-{n}": [*SOFLOW, *o] for n, o in NETS.items()},
    **{f"soflowc-{n}": [*SOFLOW_CIFAR, *o] for n, o in NETS.items()},
    **{f"mf-{n}": [*MEANFLOW_CIFAR, *o] for n, o in NETS.items()},
    **{f"mfin-{n}": [*MEANFLOW_IN, *o] for n, o in NETS.items()},
    **{f"fm-{n}": [*FM, *o] for n, o in NETS.items()},
}


SETTINGS["mf-dit4-lr1e3"] = [*SETTINGS["mf-dit4"], *FAST]
SETTINGS["mfin-dit4-lr1e3"] = [*SETTINGS["mfin-dit4"], *FAST]
SETTINGS["fm-dit4-lr1e3"] = [*SETTINGS["fm-dit4"], *FAST]


def variant(base: str, name: str, *extra: str) -> None:
    SETTINGS[name] = [*SETTINGS[base], *extra]


# SoFlow objective variants on the U-Nets
for net in ("dit4", "u32"):
    variant(f"soflow-{net}", f"soflow-{net}-r1", "objective.r_init=1.0", "objective.r_end=0.001")
    variant(f"soflow-{net}", f"soflow-{net}-p075", "objective.p=0.75", "objective.eps=0.001")
    variant(f"soflow-{net}", f"soflow-{net}-v25", "objective.velocity_loss_ratio=0.25")
    variant(f"soflow-{net}", f"soflow-{net}-v75", "objective.velocity_loss_ratio=0.75")
    variant(f"soflow-{net}", f"soflow-{net}-lr1e3", "train.lr=0.001")
    variant(f"soflow-{net}", f"soflow-{net}-ema999", "train.ema_decay=0.999")
    variant(f"soflow-{net}", f"soflow-{net}-m1", "objective.mix_ratio=1.0")
    variant(f"soflow-{net}", f"soflow-{net}-nodecay", "objective.cfg_decay_time=1.0")
    variant(f"soflow-{net}", f"soflow-{net}-tc", "objective.time_mean=[-0.4, -2.0, 0.0]")
    variant(f"soflow-{net}", f"soflow-{net}-r1p075", "objective.r_init=1.0", "objective.r_end=0.001",
            "objective.p=0.75", "objective.eps=0.001")
    variant(f"soflow-{net}", f"soflow-{net}-lr1e3m1", "train.lr=0.001", "objective.mix_ratio=1.0")
    variant(f"soflow-{net}", f"soflow-{net}-lr1e3m1e99", "train.lr=0.001", "objective.mix_ratio=1.0",
            "train.ema_decay=0.99")
    variant(f"soflow-{net}", f"soflow-{net}-r1lr1e3", "objective.r_init=1.0", "objective.r_end=0.001", "train.lr=0.001")

# settings every run shares: one thread, cheap previews, checkpoints only where asked
COMMON = ["train.threads=1", "train.sample_num=100", "train.sample_nfe=[1]", "train.sample_every=0",
          "train.log_every=100", "train.device=cpu"]


def method_of(overrides: list[str]) -> str:
    return [o.split("=", 1)[1] for o in overrides if o.startswith("method=")][-1]


def append(out: Path, entry: dict) -> None:
    """Append one entry to the JSON list in `out` (created when missing)."""
    doc = json.loads(out.read_text()) if out.exists() else []
    doc.append(entry)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")


def eval_weights(run: Path, nfe: int, guidance: float, weights: str) -> dict:
    """The `soflow eval fmnist` scores (100 samples per class, seed 0) of the run's latest
    checkpoint, with its EMA or its online weights."""
    cfg, flow, step = load_run(run, weights=weights, warn=lambda m: None)
    labels = torch.arange(10).repeat_interleave(100)
    x = METHODS[cfg.method].sample(flow, len(labels), nfe, seed=0, labels=labels, guidance=guidance)
    return {"step": step, **fmnist_scores(x, labels, cfg.data.path)}


def score(run: Path, method: str, args) -> list[dict]:
    nfes, scales = SCORING[method]
    if method == "flow_matching":
        nfes, scales = args.fm_nfe or nfes, args.fm_guidance or scales
    rows = []
    for weights in args.weights:
        for g in scales:
            for nfe in nfes:
                r = eval_weights(run, nfe, g, weights)
                rows.append({"nfe": nfe, "guidance": g, "weights": weights, "step": r["step"],
                             "classifier_fd": round(r["classifier_fd"], 2),
                             "class_accuracy": round(r["class_accuracy"], 4)})
                print(f"  step {r['step']} {weights} nfe {nfe} guidance {g}: FD {r['classifier_fd']:.1f} "
                      f"acc {r['class_accuracy']:.3f}", flush=True)
    return rows


def run_setting(name: str, args) -> None:
    overrides = [*COMMON, f"train.total_steps={args.steps}", f"train.seed={args.seed}",
                 f"train.checkpoint_every={args.steps}", *SETTINGS[name], *args.set]
    method = method_of(overrides)
    cfg = load("fmnist", overrides)
    run = Path(args.runs) / f"{name}-s{args.steps}-seed{args.seed}{'-time' if args.time_only else ''}"
    if run.exists():
        shutil.rmtree(run)
    stamps = []
    on_step = lambda step, flow: stamps.append((step, time.perf_counter()))
    evals = sorted({k for k in args.eval_at if 0 < k < args.steps} | {args.steps}) if not args.time_only else [args.steps]
    train_seconds, done, curve = 0.0, 0, []
    for k in evals:
        start = time.perf_counter()
        result = train(cfg, run, stop_after=k - done if k < args.steps else None, on_step=on_step)
        train_seconds += time.perf_counter() - start
        done = result["step"]
        if args.time_only:
            break
        curve.extend(score(run, method, args))
    # median time between consecutive optimizer steps: robust to set-up, checkpoints and the
    # scoring pauses of --eval-at
    gaps = sorted(b[1] - a[1] for a, b in zip(stamps, stamps[1:]) if b[0] == a[0] + 1)
    per_step = gaps[len(gaps) // 2] if gaps else None
    params = sum(p.numel() for p in load_run(run, warn=lambda m: None)[1].net.parameters())
    entry = {"name": name, "method": method, "overrides": SETTINGS[name] + list(args.set), "steps": args.steps,
             "seed": args.seed, "batch_size": cfg.train.batch_size, "params": params,
             "train_seconds": round(train_seconds, 1), "seconds_per_step": round(per_step, 4) if per_step else None,
             "threads": torch.get_num_threads(), "time_only": args.time_only, "scores": curve,
             "commit": git_commit(), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    append(Path(args.out), entry)
    print(f"{name}: {params / 1e6:.2f}M params, {per_step:.3f} s/step, train {train_seconds:.0f} s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=[], help=f"names from: {', '.join(SETTINGS)}")
    ap.add_argument("--rescore", nargs="*", default=[], help="score these existing run folders (latest checkpoint)"
                    " with --weights instead of training")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-at", type=int, nargs="*", default=[], help="also score at these steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides for every setting")
    ap.add_argument("--fm-nfe", type=int, nargs="*", help="flow-matching step counts to score")
    ap.add_argument("--fm-guidance", type=float, nargs="*", help="flow-matching CFG scales to score")
    ap.add_argument("--weights", nargs="+", default=["ema"], choices=["ema", "online"],
                    help="score the EMA and/or the online weights")
    ap.add_argument("--time-only", action="store_true", help="record seconds per step only")
    ap.add_argument("--runs", default="/tmp/sweep-fmnist")
    ap.add_argument("--out", default="benchmarks/results/sweep-fmnist.json")
    args = ap.parse_args()
    if args.rescore:
        torch.set_num_threads(1)
        for run in map(Path, args.rescore):
            cfg, _, step = load_run(run, warn=lambda m: None)
            append(Path(args.out), {"name": run.name, "rescore": True, "method": cfg.method, "step": step,
                                    "scores": score(run, cfg.method, args), "commit": git_commit()})
        return
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    for name in args.settings:
        run_setting(name, args)


if __name__ == "__main__":
    main()
