"""The first hour on a GPU, as one script: training cost, sampling throughput and a short real run.

    python benchmarks/gpu.py --out benchmarks/results/gpu-h100.json [--vae /path/to/sd-vae-ft-mse]
    python benchmarks/gpu.py --smoke --out /tmp/gpu-smoke.json     # CPU, tiny sizes, under a minute

Writes one JSON document with three parts:

1. `training`: SoFlow (velocity_loss_ratio 0 and 0.75), MeanFlow and flow matching at the per-GPU
   batch of DiT-B/2 and DiT-XL/2 (256 over 8 GPUs: 32), training steps per second and peak GPU
   memory, in TF32 and bf16 with the network eager, then bf16 with `torch.compile` (the compiled
   entries run after the sampling and are skipped, and listed, when the time budget would be
   exceeded; a compiler that refuses MeanFlow's JVP leaves an `error` in that entry).
   Under torchrun with several GPUs, XL/2 is sharded with FSDP (`fully_shard`, as train.fsdp).
   The paper's figures to compare with are copied under `paper`.
2. `sampling`: 1- and 2-NFE images per second at both sizes, bf16, without the SD-VAE decode and,
   when --vae names a local folder, with it.
3. `b4_run`: `soflow train` (the imagenet-dit-b4 recipe, bf16) for 300 steps on synthetic latents;
   the loss must fall (`loss_fell`), else the script exits 1.

Every time is measured between `torch.cuda.synchronize()` calls after warm-up steps. The full run
is sized to finish within 8 minutes on one H100: --budget-s (330 s) caps the timed sections, a
compiled entry starts only with 90 s of it left, and the 300-step run takes well under a minute.
It has not yet run on a GPU: the first run's JSON is the first measurement. --smoke runs the same
code on the CPU: tiny DiTs, two timed steps, compile with the eager back-end (traced, not
code-generated), FSDP on a 1-process gloo group, and a 60-step run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from cost import METHODS, make_step, sync  # benchmarks/cost.py
from record import git_commit, write_json  # benchmarks/record.py
from write_latents import write_folder  # benchmarks/write_latents.py

from soflow.data.vae import load_vae
from soflow.errors import SoflowError
from soflow.nets import build
from soflow.sampling import sample
from soflow.solution import SolutionFlow

PAPER = {"note": "the SoFlow paper's training-cost table (ImageNet 256, DiT-XL/2)",
         "meanflow": {"iters_per_s": 2.39, "memory_gb": 51.45},
         "soflow": {"iters_per_s": [2.84, 2.94], "memory_gb": [38.95, 35.44]}}

# name in the report -> (network, overrides); per-GPU batch
FULL = {"sizes": {"dit-b2": ("dit-b2", {}), "dit-xl2": ("dit-xl2", {})}, "batch": 32, "warmup": 3, "steps": 10,
        "sample_batch": 256, "sample_repeats": 3, "latent": (4, 32, 32), "run_steps": 300, "run_batch": 64,
        "compile_backend": "inductor"}
SMOKE = {"sizes": {"dit-b2": ("dit-tiny", {"input_size": 8}),
                   "dit-xl2": ("dit-tiny", {"input_size": 8, "hidden_size": 64, "num_heads": 2, "depth": 2})},
         "batch": 4, "warmup": 1, "steps": 2, "sample_batch": 8, "sample_repeats": 1, "latent": (4, 8, 8),
         "run_steps": 60, "run_batch": 32, "compile_backend": "eager"}
PRECISIONS = {"tf32": None, "bf16": torch.bfloat16}
COMPILE_RESERVE_S = 90  # a compiled entry starts only with this much of the budget left


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.skipped = []

    def allows(self, what: str, needs: float = 0.0) -> bool:
        if time.monotonic() + needs <= self.deadline:
            return True
        self.skipped.append(what)
        return False


def timed(fn, device, warmup: int, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls after `warmup` calls, synchronized."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def make_net(sizes: dict, size: str, device, fsdp: bool):
    name, overrides = sizes[size]
    torch.manual_seed(0)
    with device:  # initialized where it runs: XL/2's 675M weights take seconds on a CPU
        net = build(name, num_classes=1000, **overrides)
    if fsdp:
        from soflow.train.parallel import shard

        shard(net)
    return net


def training_entries(setup: dict, device, budget: Budget, fsdp_sizes: set, compiled: bool) -> list[dict]:
    """Steps/s and peak memory of every method at each size: TF32 and bf16 eager, or bf16 compiled."""
    grid = [(size, precision) for size in setup["sizes"] for precision in (("bf16",) if compiled else PRECISIONS)]
    reserve = COMPILE_RESERVE_S if compiled and setup is FULL else 0
    entries = []
    for size, precision in grid:
        label = f"{size} {precision} {'compiled' if compiled else 'eager'}"
        if not budget.allows(label, reserve):
            continue
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # "tf32": fp32 on TF32
        net = make_net(setup["sizes"], size, device, fsdp=size in fsdp_sizes)
        call = torch.compile(net, backend=setup["compile_backend"]) if compiled else net
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
        x0 = torch.randn(setup["batch"], *net.sample_shape, device=device)
        labels = torch.randint(1000, (setup["batch"],), device=device)
        flow = SolutionFlow(net)
        for method, objective in METHODS.items():
            if not budget.allows(f"{label} {method}", reserve):
                continue
            entry = {"size": size, "method": method, "precision": precision, "compile": compiled,
                     "batch_per_gpu": setup["batch"], "fsdp": size in fsdp_sizes}
            _, step = make_step(flow, objective(), call, x0, labels, opt, PRECISIONS[precision])
            reset_peak(device)
            try:
                seconds = timed(step, device, setup["warmup"], setup["steps"])
                entry.update(iters_per_s=1 / seconds, step_s=seconds, peak_memory_gb=peak_gb(device))
            except Exception as e:  # noqa: BLE001 - out of memory, or a compiler refusing MeanFlow's JVP
                entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            opt.zero_grad(set_to_none=True)
            entries.append(entry)
            print(json.dumps(entry), flush=True)
        del net, call, opt, flow
        reset_peak(device)
    return entries


def sampling_entries(setup: dict, device, budget: Budget, vae) -> list[dict]:
    """1- and 2-NFE images/s (bf16 autocast on a GPU), with the VAE decode when a VAE is given."""
    dtype = torch.bfloat16 if device.type == "cuda" else None
    n, entries = setup["sample_batch"], []
    for size in setup["sizes"]:
        if not budget.allows(f"sampling {size}"):
            continue
        flow = SolutionFlow(make_net(setup["sizes"], size, device, fsdp=False)).eval()
        for nfe in (1, 2):
            def draw():
                with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    return sample(flow, n, nfe=nfe, seed=0, batch_size=n, device=device)

            entry = {"size": size, "nfe": nfe, "batch": n,
                     "images_per_s": n / timed(draw, device, 1, setup["sample_repeats"])}
            if vae is not None:
                from soflow.data.vae import decode

                with_decode = lambda: decode(vae, draw().float())  # noqa: E731
                entry["images_per_s_with_vae_decode"] = n / timed(with_decode, device, 1, setup["sample_repeats"])
            entries.append(entry)
            print(json.dumps(entry), flush=True)
        flow = None  # the network goes before the next size is built
        reset_peak(device)
    return entries


def b4_run(setup: dict, device, work: Path) -> dict:
    """`soflow train` with the imagenet-dit-b4 recipe on synthetic latents; the loss must fall."""
    from soflow.run.config import load
    from soflow.train.loop import train

    c, h, w = setup["latent"]
    data = write_folder(work / "latents", 4096, classes=10, shape=(c, h, w))
    steps, log_every = setup["run_steps"], max(1, setup["run_steps"] // 12)
    overrides = [f"data.path={data}", f"train.total_steps={steps}", f"train.batch_size={setup['run_batch']}",
                 f"train.log_every={log_every}", f"train.checkpoint_every={steps}", "train.sample_every=0",
                 "train.sample_num=16", "train.sample_nfe=[1]", f"train.device={device.type}", "train.lr=0.0003",
                 f"train.precision={'bf16' if device.type == 'cuda' else 'fp32'}"]
    if setup is SMOKE:
        overrides.append("model.net_args={hidden_size: 64, depth: 2, num_heads: 2}")
    start = time.perf_counter()
    train(load("imagenet-dit-b4", overrides), work / "run")
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    third = max(1, len(losses) // 3)
    first, last = statistics.mean(losses[:third]), statistics.mean(losses[-third:])
    return {"steps": steps, "batch": setup["run_batch"], "seconds": time.perf_counter() - start,
            "loss_first_third": first, "loss_last_third": last, "loss_fell": last < first,
            "losses": {r["step"]: r["loss"] for r in records},
            "velocity_mse": {r["step"]: r.get("velocity_mse") for r in records}}


def start_group(smoke: bool) -> tuple[int, set]:
    """World size, and the sizes to shard: XL/2 under torchrun with several GPUs; in --smoke, XL/2
    on a 1-process gloo group, so that the sharded code runs."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from soflow import distributed

        distributed.setup("auto")
        return world, {"dit-xl2"}
    if smoke:
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        return 1, {"dit-xl2"}
    return 1, set()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: check that the script runs")
    ap.add_argument("--vae", metavar="DIR", help="local sd-vae-ft-mse folder: also time sampling with the decode")
    ap.add_argument("--budget-s", type=float, default=330,
                    help="seconds for the timed sections (the run ends within about 2 minutes more)")
    ap.add_argument("--out", help="JSON file to write")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu.py: no CUDA device; run with --smoke to check the script on the CPU", file=sys.stderr)
        return 2
    setup = SMOKE if args.smoke else FULL
    started = time.perf_counter()
    world, fsdp_sizes = start_group(args.smoke)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu") if args.smoke else torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    vae = load_vae(args.vae, device) if args.vae else None  # a bad folder fails now, not after minutes
    budget = Budget(args.budget_s)
    result = {"smoke": args.smoke, "world_size": world, "paper": PAPER,
              "training": training_entries(setup, device, budget, fsdp_sizes, compiled=False),
              "sampling": sampling_entries(setup, device, budget, vae)}
    result["training"] += training_entries(setup, device, budget, fsdp_sizes, compiled=True)
    with tempfile.TemporaryDirectory() as work:
        result["b4_run"] = b4_run(setup, device, Path(work))
    result["skipped"] = budget.skipped
    result["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "cuda": torch.version.cuda,
                         "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    result["commit"], result["wall_s"] = git_commit(), time.perf_counter() - started
    if args.out and int(os.environ.get("RANK", "0")) == 0:
        write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("skipped", "wall_s")} | {"loss_fell": result["b4_run"]["loss_fell"]}))
    return 0 if result["b4_run"]["loss_fell"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SoflowError as e:
        sys.exit(print(f"gpu.py: error: {e}", file=sys.stderr) or 2)
