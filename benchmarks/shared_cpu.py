"""`toy2d` on a CPU that other processes are using.

Runs `soflow train --config toy2d` for 300 steps alone and again beside two busy processes (pure
Python loops, one per core), once with soflow's thread choice (train.threads=0: one intra-op thread
for this small network) and once with two intra-op threads (what PyTorch picks on 2 cores when
nothing else decides). The time of the training steps comes from metrics.jsonl (batch x steps /
samples_per_s); OMP_NUM_THREADS is removed from the environment so the setting decides.

    python benchmarks/shared_cpu.py [--steps 300] [--out benchmarks/results/shared-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import git_commit, write_json

BUSY = "while True: pass"


def train_seconds(steps: int, threads: int, busy: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        with tempfile.TemporaryDirectory() as run:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "soflow", "train", "--config", "toy2d", "--run-dir", run,
                            "--set", f"train.total_steps={steps}", "--set", f"train.log_every={steps // 3}",
                            "--set", f"train.threads={threads}", "--set", "train.sample_num=200"],
                           check=True, capture_output=True, env=env)
            wall = time.perf_counter() - start
            records = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
            batch = 512  # the toy2d preset's batch
            steps_s = sum((steps // 3) * batch / r["samples_per_s"] for r in records)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    return {"threads": threads, "busy_processes": busy, "step_seconds": steps_s, "command_seconds": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "shared-cpu.json"))
    args = p.parse_args()
    rows = [train_seconds(args.steps, threads, busy) for threads in (0, 2) for busy in (0, 2)]
    for r in rows:
        print(f"threads={r['threads']} busy={r['busy_processes']}: steps {r['step_seconds']:.1f} s, "
              f"command {r['command_seconds']:.1f} s", flush=True)
    by = {(r["threads"], r["busy_processes"]): r["step_seconds"] for r in rows}
    doc = {"benchmark": "shared_cpu", "commit": git_commit(), "steps": args.steps, "cores": os.cpu_count(), "runs": rows,
           "slowdown_beside_two_busy": {"auto (1 thread)": by[(0, 2)] / by[(0, 0)],
                                        "2 threads": by[(2, 2)] / by[(2, 0)]}}
    print(write_json(args.out, doc))


if __name__ == "__main__":
    main()
