"""`soflow env`: what a bug report needs about this machine, as text or JSON.

Nothing here starts a process group or allocates on a device: CUDA is asked only for what the
driver reports (names, memory, capability), and optional packages are found by their installed
metadata, without importing them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from importlib import metadata

import torch

from .. import __version__
from ..threads import available_cores

# Packages soflow uses when present: the extras of pyproject.toml, and the test tools.
OPTIONAL = ("diffusers", "h5py", "torchvision", "torch-fidelity", "tensorboard", "triton", "pytest")
# Settings read from the environment that change what a run does.
VARIABLES = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NCCL_DEBUG",
             "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "SOFLOW_INCEPTION_WEIGHTS")


def collect() -> dict:
    """The facts `soflow env` reports: versions, devices, threads, backends, packages, variables."""
    return {"soflow": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, **_cuda_stack(), "devices": _devices(), "threads": _threads(),
            "distributed": _backends(), "packages": _packages(), "environment": _variables()}


def _cuda_stack() -> dict:
    """CUDA, cuDNN and NCCL versions of this torch build (None where it has none)."""
    nccl = None
    if torch.version.cuda and torch.distributed.is_available() and torch.distributed.is_nccl_available():
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except (RuntimeError, AttributeError, TypeError):  # the build names NCCL but cannot load it
            nccl = "unavailable"
    return {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.version.cuda else None,
            "nccl": nccl}


def _devices() -> dict:
    cuda = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            cuda.append({"index": i, "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                         "capability": f"{p.major}.{p.minor}"})
    return {"cpu_cores": available_cores(), "cpu_count": os.cpu_count(), "memory_gb": _host_memory_gb(), "cuda": cuda}


def _host_memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None


def _threads() -> dict:
    return {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads(),
            "parallel": _parallel_backend()}


def _parallel_backend() -> str:
    """The parallel back-end torch was built with (OpenMP, TBB, native)."""
    for line in torch.__config__.parallel_info().splitlines():
        if line.startswith("ATen parallel backend:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _backends() -> dict:
    d = torch.distributed
    return {name: bool(d.is_available() and getattr(d, f"is_{name}_available")()) for name in ("gloo", "nccl", "mpi")}


def _packages() -> dict:
    found = {}
    for name in OPTIONAL:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _variables() -> dict:
    return {name: os.environ[name] for name in VARIABLES if name in os.environ}


def report(info: dict) -> str:
    """The text form: one `key: value` line each, devices and packages one per line."""
    lines = [f"{k}: {info[k]}" for k in ("soflow", "python", "platform", "torch", "cuda", "cudnn", "nccl")]
    dev = info["devices"]
    lines.append(f"cpu: {dev['cpu_cores']} cores usable of {dev['cpu_count']}, {dev['memory_gb']} GB memory")
    lines += [f"gpu {g['index']}: {g['name']}, {g['memory_gb']} GB, compute capability {g['capability']}"
              for g in dev["cuda"]] or ["gpu: none visible to torch"]
    t = info["threads"]
    lines.append(f"threads: {t['intra_op']} intra-op, {t['inter_op']} inter-op ({t['parallel']})")
    lines.append("distributed: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["distributed"].items()))
    lines.append("packages: " + ", ".join(f"{k} {v or 'absent'}" for k, v in info["packages"].items()))
    lines.append("environment: " + (", ".join(f"{k}={v}" for k, v in info["environment"].items()) or "none set"))
    return "\n".join(lines)


def cmd_env(args: argparse.Namespace) -> int:
    """`soflow env`: print the environment report (JSON with --json)."""
    info = collect()
    print(json.dumps(info, indent=1) if args.json else report(info))
    return 0
