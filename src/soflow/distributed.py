"""Process-group set-up from torchrun's environment, and small collective helpers.

Restarts under torchrun (`--max-restarts`): the agent keeps one key-value store for the whole job
and every round of workers meets in it. The keys the process group writes (each rank's address)
are the same in every round, so a restarted worker could read an address of the round that died
and fail to connect ("Gloo connectFullMesh failed ... Connection refused", or a hang). The
restart count is no namespace either: each node's agent counts its own restarts, and an agent
that restarts because another node failed does not count it. So each round agrees on a fresh
namespace first (`round_token`) and the process group keeps its keys under it.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Env:
    """This process's place in the run: rank, number of ranks (world) and device."""

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
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None,
                                **_round_store(rank, world))
    return Env(rank, world, device)


ROUND_TIMEOUT = timedelta(minutes=10)


def _round_store(rank: int, world: int) -> dict:
    """init_process_group's store arguments: under torchrun's shared agent store, a client of it
    with this round's own key prefix; otherwise none (the env:// rendezvous: a fresh store)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=ROUND_TIMEOUT)
    token = round_token(store, rank, world)
    return {"store": dist.PrefixStore(f"soflow/round-{token}/", store), "rank": rank, "world_size": world}


def round_token(store: dist.Store, rank: int, world: int, timeout: float = ROUND_TIMEOUT.total_seconds()) -> str:
    """A token that every rank of this round gets and no earlier round used, through a store
    that may hold any round's keys.  Rank 0 draws it; rank r sends a fresh nonce and takes the
    token only from a reply that quotes that nonce; rank 0 goes on once each rank acknowledges
    the token itself.  A value left by a dead round can never match either fresh value."""
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"soflow/hello/{rank}", nonce)
        reply = _poll(lambda: _get(store, f"soflow/reply/{rank}"), lambda v: v.startswith(nonce + "/"), timeout)
        token = reply.split("/", 1)[1]
        store.set(f"soflow/ack/{rank}", token)
        return token
    token, waiting = uuid.uuid4().hex, set(range(1, world))

    def answer():
        for r in sorted(waiting):
            hello = _get(store, f"soflow/hello/{r}")
            if hello is not None:
                store.set(f"soflow/reply/{r}", f"{hello}/{token}")
            if _get(store, f"soflow/ack/{r}") == token:
                waiting.discard(r)
        return not waiting

    _poll(answer, bool, timeout)
    return token


def _get(store, key: str) -> str | None:
    return store.get(key).decode() if store.check([key]) else None


def _poll(read, done, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if value is not None and done(value):
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"torchrun round: no answer from the other ranks within {timeout:.0f} s")
        time.sleep(0.02)


def teardown(env: Env) -> None:
    """End the process group after a last barrier (nothing for one process)."""
    if env.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_gather_objects(env: Env, obj: object) -> list:
    """Every rank's `obj`, in rank order, on every rank (a collective)."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(env: Env, values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over the ranks (a collective); `values` itself on one rank."""
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
    """Wait for every rank (nothing for one process)."""
    if env.distributed:
        dist.barrier()
