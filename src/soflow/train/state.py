"""A run's state: saving it as a checkpoint (weights, EMA, optimizer, each rank's random state)
and resuming from one, with the config's optimizer settings and what changed in the config."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import distributed
from ..errors import CheckpointError
from ..run.checkpoint import run_state, save_checkpoint
from ..run.config import Config
from ..run.load import config_differences, config_value
from ..seeding import derive_seed
from ..solution import SolutionFlow
from . import parallel
from .ema import EMA
from .runlog import RunLog, plural


def rng_state(device: torch.device) -> dict:
    """This process's CPU (and CUDA) random number generator states."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore the states taken by `rng_state`."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def resume(cfg: Config, env: distributed.Env, log: RunLog, optimizer: torch.optim.Optimizer, resumed: dict,
           flow: SolutionFlow) -> int:
    """Optimizer state, step and this rank's random state from the checkpoint; returns the step."""
    applied = []
    before = str(config_value(resumed["config"], "train.optimizer") or cfg.train.optimizer).lower()
    other_kind = before != cfg.train.optimizer.lower()
    if other_kind:  # AdamW moments are not RAdam's (nor the reverse): no state carries over
        log.warn(f"warning: train.optimizer is {cfg.train.optimizer} here but {before} in the checkpoint: "
                 f"{cfg.train.optimizer} starts with a fresh state (no moments) at step {int(resumed['step'])}; "
                 f"--set train.optimizer={before} keeps the checkpoint's")
    elif resumed["optimizer"]:  # converted reference runs come without one
        parallel.load_optimizer(flow.net, optimizer, resumed["optimizer"])
        applied = apply_optimizer_settings(optimizer)
    step = int(resumed["step"])
    rng = resumed["rng"]
    if len(rng) != env.world:
        if rng:
            log.warn(f"warning: checkpoint written by {plural(len(rng), 'rank')}, resuming on {env.world}: "
                     "random streams restart, so the run will not repeat an uninterrupted one exactly")
        torch.manual_seed(derive_seed(cfg.train.seed, env.rank, step))
    else:
        set_rng_state(rng[env.rank], env.device)
    log.info(f"resumed from {resumed['path']} at step {step}")
    changed = config_changes(resumed["config"], cfg.to_dict())
    if changed:
        log.warn(f"warning: config differs from the checkpoint's, and this run takes the config's values: {changed} "
                 "(--set KEY=VALUE gives a key the checkpoint's value back)")
    if applied:
        log.info(f"optimizer settings of the config applied over the checkpoint's: {', '.join(applied)}")
    return step


CONFIGURED = ("lr", "betas", "weight_decay", "decoupled_weight_decay")


def apply_optimizer_settings(optimizer: torch.optim.Optimizer) -> list[str]:
    """Put the settings the optimizer was built with (the config's) back into every parameter
    group once its state is loaded: load_state_dict restores the values the checkpoint was saved
    with, so a resume with changed settings would silently keep the old ones.  Returns
    "name old -> new" for each setting that changed."""
    applied = []
    for name in (n for n in CONFIGURED if n in optimizer.defaults):
        value = optimizer.defaults[name]
        before = {tuple(g[name]) if isinstance(g.get(name), list) else g.get(name) for g in optimizer.param_groups}
        if before != {value}:
            applied.append(f"{name} {', '.join(map(str, before))} -> {value}")
        for group in optimizer.param_groups:
            group[name] = value
    return applied


def config_changes(old: dict, new: dict, shown: int = 4) -> str:
    """"key old -> new" for the first `shown` keys whose values differ, and how many more do ("" if none)."""
    keys = config_differences(old, new)
    said = ", ".join(f"{k} {config_value(old, k)!r} -> {config_value(new, k)!r}" for k in keys[:shown])
    return said + (f" (and {len(keys) - shown} more)" if len(keys) > shown else "")


def save_run_state(env: distributed.Env, run_dir: Path, cfg: Config, flow: SolutionFlow, ema: EMA,
                   optimizer: torch.optim.Optimizer, step: int) -> None:
    """Save a checkpoint of model, EMA, optimizer and every rank's RNG state at `step` (a collective)."""
    rng = distributed.all_gather_objects(env, rng_state(env.device))
    net_state, optimizer_state = parallel.full_state(flow.net, optimizer)
    ema_state, _ = parallel.full_state(ema.model)
    failed = None
    if env.is_main:
        state = run_state(step, cfg.to_dict(), flow.net.sample_shape, flow.num_classes, net_state, ema_state,
                          optimizer_state, [{k: v.cpu() for k, v in r.items()} for r in rng], env.world)
        try:
            save_checkpoint(run_dir, state, cfg.train.keep_last, cfg.train.keep_every)
        except CheckpointError as e:
            failed = str(e)
    failed = distributed.all_gather_objects(env, failed)[0]  # also the barrier: every rank stops on a failed write
    if failed:
        raise CheckpointError(failed)
