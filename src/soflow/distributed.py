"""Process-group set-up from torchrun's environment, and small collective helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Env:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device_pref: str = "auto") -> Env:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (torchrun) and start nccl (CUDA) or gloo (CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device_pref = str(device_pref).lower()  # train.device is validated without regard to case
    if device_pref not in DEVICES:
        raise ConfigError(f"device {device_pref!r}: choose one of {', '.join(DEVICES)} "
                          "(train.device, or --device of the command)")
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device cuda (train.device or --device) was asked for, but this process sees no CUDA "
                          "device (a CPU-only torch build, or CUDA_VISIBLE_DEVICES empty); use cpu or auto")
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return Env(rank, world, device)


def teardown(env: Env) -> None:
    if env.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_gather_objects(env: Env, obj) -> list:
    if not env.distributed:
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(env: Env, values: torch.Tensor) -> torch.Tensor:
    if env.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.AVG if env.device.type == "cuda" else dist.ReduceOp.SUM)
        if env.device.type != "cuda":  # gloo has no AVG
            values /= env.world
    return values


class SharedFlag:
    """A flag raised on any rank, seen by every rank at the same step, one step late: the
    all-reduce runs asynchronously, so the training step never waits for it."""

    def __init__(self, env: Env):
        self.env = env
        self.pending = None

    def poll(self, local: bool) -> bool:
        if not self.env.distributed:
            return local
        seen = False
        if self.pending is not None:
            work, value = self.pending
            work.wait()
            seen = bool(value.item())
        value = torch.tensor([float(local)], device=self.env.device)
        self.pending = (dist.all_reduce(value, op=dist.ReduceOp.MAX, async_op=True), value)
        return seen


def barrier(env: Env) -> None:
    if env.distributed:
        dist.barrier()
