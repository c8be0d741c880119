"""Training-step cost of SoFlow, MeanFlow and flow matching on the same DiT and batch.

For each method: median step time (methods interleaved, after warm-up), bytes the autograd graph
saves for backward (saved-tensor hooks), and peak memory (CUDA); plus 1-NFE sampling throughput
against a bare network forward.  SoFlow with training-time guidance is timed at one fixed scale and
with the scale as a network input (GUIDED_METHODS).  Results go to JSON (--out) with a `ratios` object.  MeanFlow is
timed both eager and with its network compiled (`--compile-meanflow auto`), and the faster counts.

    python benchmarks/cost.py --out benchmarks/results/cost-cpu.json          # DiT-S/2, 16x16x4, batch 16
    python benchmarks/cost.py --net dit-b2 --input-size 32 --batch 64 --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from soflow.nets import build
from soflow.objectives import FlowMatchingLoss, MeanFlowLoss, SoFlowLoss
from soflow.sampling import sample
from soflow.solution import SolutionFlow

from record import git_commit, write_json  # benchmarks/record.py

# No training-time guidance for any method, so the comparison is of the objectives themselves.
# SoFlow with velocity_loss_ratio=0 is its most expensive split (floor: one extra no-grad forward
# on every row, 4/3 of a flow-matching step); the ImageNet recipe's ratio 0.75 is reported too.
METHODS = {
    "flow_matching": lambda: FlowMatchingLoss(),
    "soflow": lambda: SoFlowLoss(velocity_loss_ratio=0.0, total_steps=1000),
    "soflow_ratio075": lambda: SoFlowLoss(velocity_loss_ratio=0.75, total_steps=1000),
    "meanflow": lambda: MeanFlowLoss(),
}
# Training-time guidance at the fmnist preset's settings: one fixed scale, and the scale as a network
# input drawn per row (its own network, with the w embedder); the target is a ratio <= 1.1.
GUIDED = dict(velocity_loss_ratio=0.75, cfg_scale=2.0, mix_ratio=0.5, cfg_drop_rate=0.1, cfg_decay_time=0.8,
              total_steps=1000)
GUIDED_METHODS = {
    "soflow_guided": lambda: SoFlowLoss(**GUIDED),
    "soflow_any_guidance": lambda: SoFlowLoss(**GUIDED, guidance_range=(1.0, 4.0)),
}


def saved_bytes(fn) -> int:
    """Bytes of tensors the autograd graph keeps for backward during fn() (storage counted once)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        except RuntimeError:  # functorch (JVP) wrappers expose no storage: count the tensor itself
            total += t.numel() * t.element_size()
            return t
        if key not in seen:
            seen.add(key)
            total += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = fn()
    loss.backward()
    return total


def make_step(flow, objective, net, x0, labels, opt, dtype):
    def run():
        with torch.autocast(x0.device.type, dtype=dtype, enabled=dtype is not None):
            return objective(flow, x0, labels, step=100, net=net)

    def step():
        loss, _ = run()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return run, step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", default="dit-s2")
    ap.add_argument("--input-size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--compile-meanflow", choices=("auto", "no"), default="auto",
                    help="auto: time MeanFlow compiled and not, keep the faster")
    ap.add_argument("--out")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    net = build(args.net, input_size=args.input_size, num_classes=1000).to(device)
    flow = SolutionFlow(net)
    x0 = torch.randn(args.batch, *net.sample_shape, device=device)
    labels = torch.randint(1000, (args.batch,), device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)

    variants = {name: make_step(flow, ctor(), net, x0, labels, opt, dtype) for name, ctor in METHODS.items()}
    variants["soflow_guided"] = make_step(flow, GUIDED_METHODS["soflow_guided"](), net, x0, labels, opt, dtype)
    net_w = build(args.net, input_size=args.input_size, num_classes=1000, guidance_input=True).to(device)
    opt_w = torch.optim.AdamW(net_w.parameters(), lr=1e-5)
    variants["soflow_any_guidance"] = make_step(SolutionFlow(net_w), GUIDED_METHODS["soflow_any_guidance"](), net_w,
                                                x0, labels, opt_w, dtype)
    if args.compile_meanflow == "auto":
        compiled = torch.compile(net)
        variants["meanflow_compiled"] = make_step(flow, MeanFlowLoss(), compiled, x0, labels, opt, dtype)

    result = {"config": vars(args), "methods": {}}
    for name, (run, step) in list(variants.items()):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            for _ in range(args.warmup):
                step()
            sync(device)
            opt.zero_grad(set_to_none=True)
            entry = {"saved_bytes": saved_bytes(run)}
        except Exception as e:  # a compiler that cannot handle the JVP leaves the eager MeanFlow
            if name != "meanflow_compiled":
                raise
            result["meanflow_compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            del variants[name]
            continue
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            entry["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["methods"][name] = entry

    times = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, so drifts of a noisy machine hit every method alike
        for name, (_, step) in variants.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        result["methods"][name]["median_step_s"] = statistics.median(ts)
        result["methods"][name]["iters_per_s"] = 1 / statistics.median(ts)

    if "meanflow_compiled" in result["methods"]:  # keep the faster MeanFlow
        mf, mfc = result["methods"]["meanflow"], result["methods"].pop("meanflow_compiled")
        mf.update(eager_median_step_s=mf["median_step_s"], compiled_median_step_s=mfc["median_step_s"],
                  compiled_saved_bytes=mfc["saved_bytes"], compiled=mfc["median_step_s"] < mf["median_step_s"])
        if mf["compiled"]:
            mf.update(median_step_s=mfc["median_step_s"], iters_per_s=mfc["iters_per_s"])

    # 1-NFE sampling against a bare forward of the same batch.
    flow.eval()
    with torch.no_grad():
        t1, t0_ = torch.ones(args.batch, device=device), torch.zeros(args.batch, device=device)
        bare, one = [], []
        for i in range(args.repeats + 2):
            sync(device)
            a = time.perf_counter()
            net(x0, t1, t0_, labels)
            sync(device)
            b = time.perf_counter()
            sample(flow, args.batch, nfe=1, seed=i, labels=labels, batch_size=args.batch)
            sync(device)
            c = time.perf_counter()
            if i >= 2:
                bare.append(b - a)
                one.append(c - b)
    result["sampling"] = {"bare_forward_images_per_s": args.batch / statistics.median(bare),
                          "one_nfe_images_per_s": args.batch / statistics.median(one)}

    m = result["methods"]
    result["ratios"] = {
        "soflow_over_fm_time": m["soflow"]["median_step_s"] / m["flow_matching"]["median_step_s"],
        "soflow_ratio075_over_fm_time": m["soflow_ratio075"]["median_step_s"] / m["flow_matching"]["median_step_s"],
        "meanflow_over_soflow_time": m["meanflow"]["median_step_s"] / m["soflow"]["median_step_s"],
        "meanflow_over_soflow_saved_bytes": m["meanflow"]["saved_bytes"] / m["soflow"]["saved_bytes"],
        "soflow_over_fm_saved_bytes": m["soflow"]["saved_bytes"] / m["flow_matching"]["saved_bytes"],
        "any_guidance_over_fixed_guidance_time": m["soflow_any_guidance"]["median_step_s"]
        / m["soflow_guided"]["median_step_s"],
        "one_nfe_over_bare_forward_throughput": result["sampling"]["one_nfe_images_per_s"]
        / result["sampling"]["bare_forward_images_per_s"],
    }
    result["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "device": str(device),
                         "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                         "threads": torch.get_num_threads()}
    result["commit"] = git_commit()
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
