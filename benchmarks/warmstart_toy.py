"""SoFlow started from a flow-matching model on the 2-D validation family, at equal total cost.

For each member and seed (toy2d preset network and batch):
  - flow matching trains --fm-steps steps; its checkpoint at --init-step is the starting point,
    and its last checkpoint at 100 Euler steps is the reference every ratio is taken to;
  - SoFlow fine-tunes from that checkpoint for --ft-steps steps (train.init; r(k, K) over K = --ft-steps);
  - SoFlow from scratch trains --scratch-steps steps.
Equal total cost: the flow-matching steps up to --init-step plus the fine-tuning against SoFlow from
scratch, in training wall time measured here (the flow-matching run is timed to --init-step with
--stop-after, then finished).  Scores: energy distance to fresh data, 2000 samples, at 1 NFE and
2 NFE (chained and re-noising).

    python benchmarks/warmstart_toy.py --seeds 2 --jobs 2 --out benchmarks/results/warmstart-toy-family.json
"""

from __future__ import annotations

import argparse
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
from soflow.eval import energy_distance
from soflow.methods import METHODS
from soflow.run.config import load
from soflow.run.load import load_run
from soflow.train.loop import train

from record import git_commit, write_json  # benchmarks/record.py

SOFLOW_SAMPLERS = ("1", "2-chain", "2-renoise")


def timed(cfg, run: Path, stop_after: int | None = None) -> float:
    start = time.perf_counter()
    train(cfg, run, stop_after=stop_after)
    return time.perf_counter() - start


def energies(method: str, run: Path, samplers, ref, num: int, seed: int) -> dict:
    _, flow, _ = load_run(run, warn=lambda m: None)
    out = {}
    for key in samplers:
        nfe, _, mode = key.partition("-")
        out[key] = energy_distance(METHODS[method].sample(flow, num, int(nfe), mode=mode or None, seed=seed), ref)
    return out


def one_member(dataset: str, seed: int, args, folder: Path) -> dict:
    base = [f"data.name={dataset}", f"train.seed={seed}", "train.sample_nfe=[1]", "train.sample_num=200"]
    fm_cfg = load("toy2d", [*base, "method=flow_matching", f"train.total_steps={args.fm_steps}",
                            f"train.checkpoint_every={args.init_step}", f"train.keep_every={args.init_step}",
                            f"train.log_every={args.init_step}"])
    fm = folder / f"{dataset}-{seed}-fm"
    fm_to_init = timed(fm_cfg, fm, stop_after=args.init_step)
    fm_rest = timed(fm_cfg, fm)
    init = fm / "checkpoints" / f"ckpt-{args.init_step:08d}.pt"
    ft_cfg = load("toy2d", [*base, f"train.init={init}", f"train.total_steps={args.ft_steps}",
                            f"train.checkpoint_every={args.ft_steps}", f"train.log_every={args.ft_steps}"])
    ft = folder / f"{dataset}-{seed}-ft"
    ft_seconds = timed(ft_cfg, ft)
    scratch_cfg = load("toy2d", [*base, f"train.total_steps={args.scratch_steps}",
                                 f"train.checkpoint_every={args.scratch_steps}", f"train.log_every={args.scratch_steps}"])
    scratch = folder / f"{dataset}-{seed}-scratch"
    scratch_seconds = timed(scratch_cfg, scratch)
    ref = make_dataset(fm_cfg.data).reference(args.num, seed=1000 + seed)
    return {"dataset": dataset, "seed": seed,
            "seconds": {"fm_to_init": fm_to_init, "fm_all": fm_to_init + fm_rest, "fine_tune": ft_seconds,
                        "scratch": scratch_seconds},
            "flow_matching_100": energies("flow_matching", fm, ("100",), ref, args.num, seed)["100"],
            "warm": energies("soflow", ft, SOFLOW_SAMPLERS, ref, args.num, seed),
            "scratch": energies("soflow", scratch, SOFLOW_SAMPLERS, ref, args.num, seed)}


def summarize(records: list[dict]) -> dict:
    by_ds: dict[str, list[dict]] = {}
    for r in records:
        by_ds.setdefault(r["dataset"], []).append(r)
    table = {}
    for ds, rs in by_ds.items():
        fm = statistics.mean(r["flow_matching_100"] for r in rs)
        table[ds] = {f"{kind} {s}": statistics.mean(r[kind][s] for r in rs) / fm
                     for kind in ("warm", "scratch") for s in SOFLOW_SAMPLERS}
    mean = {k: statistics.mean(t[k] for t in table.values()) for k in next(iter(table.values()))}
    seconds = {k: statistics.mean(r["seconds"][k] for r in records) for k in records[0]["seconds"]}
    warm_cost = seconds["fm_to_init"] + seconds["fine_tune"]
    return {"over_fm_100": table, "mean_over_fm_100": mean, "seconds_mean": seconds,
            "warm_cost_over_scratch_cost": warm_cost / seconds["scratch"],
            "warm_2nfe_chain_not_worse_than_1nfe_on": [ds for ds, t in table.items() if t["warm 2-chain"] <= t["warm 1"]],
            "targets": {"warm_1nfe_mean_within_2x_fm_100": mean["warm 1"] <= 2.0,
                        "warm_2nfe_not_worse_on_6_of_8": sum(t["warm 2-chain"] <= t["warm 1"] for t in table.values()) >= 6}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(FAMILY))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--fm-steps", type=int, default=2000)
    ap.add_argument("--init-step", type=int, default=1000)
    ap.add_argument("--ft-steps", type=int, default=1200)
    ap.add_argument("--scratch-steps", type=int, default=2000)
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=1, help="members trained at once, one thread each")
    ap.add_argument("--out", default="benchmarks/results/warmstart-toy-family.json")
    args = ap.parse_args()
    tasks = [(ds, seed) for ds in args.datasets for seed in range(args.seeds)]
    with tempfile.TemporaryDirectory() as tmp:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            futures = [pool.submit(one_member, ds, seed, args, Path(tmp)) for ds, seed in tasks]
            records = []
            for f in futures:
                records.append(f.result())
                print(json.dumps(records[-1]), flush=True)
    summary = summarize(records)
    write_json(args.out, {"config": vars(args), "commit": git_commit(), "records": records, "summary": summary})
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
