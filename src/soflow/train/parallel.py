"""Data parallelism: DDP by default, FSDP (`fully_shard`) on request, optional torch.compile.

With FSDP the online network and its EMA copy are sharded alike (so the EMA update stays local
to each shard) and checkpoints gather full state dicts on rank 0.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ..distributed import Env


def shard(net: nn.Module) -> None:
    """Shard `net` in place with FSDP, one unit per DiT block and one for the rest."""
    for block in getattr(net, "blocks", []):  # DiT: one unit per transformer block
        fully_shard(block)
    fully_shard(net)


def wrap(net: nn.Module, ema_model: nn.Module, env: Env, fsdp: bool, compile: bool, ddp: bool = True) -> nn.Module:
    """The callable used for the training forwards (same weights as `net`).  ddp=False leaves
    gradient averaging to `average_gradients` (for objectives that cannot call through DDP)."""
    call = net
    if env.distributed and fsdp:
        shard(net)
        shard(ema_model)
    elif env.distributed and ddp:
        call = DistributedDataParallel(net, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return torch.compile(call) if compile else call


def no_sync(net_call: nn.Module, last: bool) -> contextlib.AbstractContextManager[None]:
    """DDP's no_sync() for all but the last accumulation micro-step (a no-op context otherwise)."""
    ddp = getattr(net_call, "_orig_mod", net_call)  # through torch.compile's wrapper
    if last or not isinstance(ddp, DistributedDataParallel):
        return contextlib.nullcontext()
    return ddp.no_sync()


def is_sharded(net: nn.Module) -> bool:
    """Whether `net` is sharded by FSDP."""
    return isinstance(net, FSDPModule)


def full_state(net: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """CPU state dicts of the whole model (and optimizer); a collective when sharded."""
    if not is_sharded(net):
        cpu = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        return cpu, (optimizer.state_dict() if optimizer is not None else None)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = get_model_state_dict(net, options=opts)
    return model, (get_optimizer_state_dict(net, optimizer, options=opts) if optimizer is not None else None)


def load_optimizer(net: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state dict into `optimizer`, sharded or not."""
    if not is_sharded(net):
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(net, optimizer, keyed_by_name(net, state), options=StateDictOptions(full_state_dict=True))


def keyed_by_name(net: nn.Module, state: dict) -> dict:
    """An optimizer state keyed by parameter position (what an unsharded run or `convert-reference`
    saves) re-keyed by parameter name, the form the sharded loader needs (it fails on position
    keys).  Positions follow `net.parameters()`, which the optimizer is built over."""
    if not all(isinstance(k, int) for g in state["param_groups"] for k in g["params"]):
        return state
    names = [name for name, _ in net.named_parameters()]
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def local_tensor(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly distributed one (e.g. the grad norm under FSDP)."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def average_gradients(params: Iterable[nn.Parameter], env: Env) -> None:
    """All-reduce mean of the gradients, for steps that did not go through DDP."""
    if not env.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= env.world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))
