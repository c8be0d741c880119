"""Peak memory of `soflow sample` per torchrun rank as the number of samples grows.

A 2-rank `torchrun ... -m soflow sample --out x.npz` of a 3x64x64 pixel model (a one-block DiT
trained one step on a folder of random images, so the network costs little and the image arrays
dominate), for each --sizes N.  Every rank runs the command line through this file's `--rank-report`
mode, which calls `soflow.cli.main` and then records `getrusage(RUSAGE_SELF).ru_maxrss`.  `--src`
picks the source tree that is imported (e.g. a copy of an older checkout), `--label` names the
entry in the JSON file, which keeps the entries of other labels.

    python benchmarks/sample_memory.py --label after --sizes 2000 16000 \
        --out benchmarks/results/sample-memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from record import git_commit, write_json  # benchmarks/record.py

REPO = Path(__file__).resolve().parents[1]
NET = "model.net_args={patch_size: 8, hidden_size: 32, depth: 1, num_heads: 2}"


def rank_report(report_dir: str, argv: list[str]) -> int:
    """Run `soflow` with argv in this process, then write this rank's peak RSS (MiB) to report_dir."""
    import soflow
    from soflow.cli import main

    code = main(argv)
    rank = int(os.environ.get("RANK", "0"))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss_mib": peak_mib,
                                                                "soflow": soflow.__file__, "code": code}))
    return code


def make_run(scratch: Path) -> Path:
    """A 3x64x64 class-conditional run: 8 random images in 2 classes, one training step."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        folder = scratch / "images" / c
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    run = scratch / "run"
    sets = ["data.name=imagefolder", f"data.path={scratch / 'images'}", "data.resolution=64", "train.batch_size=4",
            "train.total_steps=1", "train.sample_num=4", "train.sample_nfe=[1]", NET]
    subprocess.run([sys.executable, "-m", "soflow", "train", "--config", "fmnist", "--run-dir", str(run),
                    *[a for s in sets for a in ("--set", s)]], check=True, capture_output=True, env=_env(None))
    return run


def _env(src: str | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def measure(run: Path, n: int, nproc: int, batch_size: int, src: str | None, scratch: Path) -> dict:
    reports = Path(tempfile.mkdtemp(dir=scratch))
    out = scratch / f"samples-{n}.npz"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(Path(__file__).resolve()), "--rank-report", str(reports), "--",
           "sample", "--checkpoint", str(run), "-n", str(n), "--nfe", "1", "--batch-size", str(batch_size),
           "--device", "cpu", "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(src))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"N={n}: soflow sample failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    ranks = sorted((json.loads(p.read_text()) for p in reports.glob("rank*.json")), key=lambda r: r["rank"])
    with np.load(out) as f:
        shape = list(f["arr_0"].shape)
    out.unlink()
    float_mib = n * int(np.prod(shape[1:])) * 4 / 2**20
    print(f"N={n}: peak RSS per rank {[round(r['peak_rss_mib']) for r in ranks]} MiB, {wall:.1f} s "
          f"(float result {float_mib:.0f} MiB), soflow from {ranks[0]['soflow']}", flush=True)
    return {"num": n, "shape": shape, "peak_rss_mib": [r["peak_rss_mib"] for r in ranks],
            "float_result_mib": float_mib, "wall_s": wall}


def import_rss(src: str | None) -> float:
    """Peak RSS (MiB) of a process that only imports torch and soflow: the floor under every rank."""
    code = "import resource, soflow.cli, torch; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                env=_env(src)).stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="after", help="entry name in the JSON file (e.g. before / after)")
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 16000])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--src", help="source folder holding the soflow package to import (default: the installed one)")
    p.add_argument("--run", help="run folder to sample from (default: a fresh 3x64x64 run)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sample-memory.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="soflow-sample-memory-") as tmp:
        scratch = Path(tmp)
        run = Path(args.run) if args.run else make_run(scratch)
        rows = [measure(run, n, args.nproc, args.batch_size, args.src, scratch) for n in args.sizes]
    path = Path(args.out)
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc[args.label] = {"commit": git_commit(), "source": args.src or "installed soflow (this checkout)",
                       "model": f"fmnist preset on 3x64x64 images, {NET}, 1 training step", "nfe": 1,
                       "nproc": args.nproc, "batch_size": args.batch_size, "threads_per_rank": 1,
                       "import_rss_mib": import_rss(args.src), "runs": rows}
    print(write_json(path, doc))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--rank-report":
        rest = sys.argv[3:]
        sys.exit(rank_report(sys.argv[2], rest[1:] if rest[:1] == ["--"] else rest))
    main()
