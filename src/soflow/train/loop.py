"""The training loop, read top to bottom: set-up, resume, steps, checkpoints, samples.

Exact resume: the data of a step is a function of (seed, rank, step), and a checkpoint holds the
model, EMA, optimizer, step and every rank's RNG states, so a run stopped and restarted ends
with the weights of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from pathlib import Path

import torch

from ..data import make_dataset
from ..data.stream import batches
from ..sampling import generate
from ..data.augment import AugmentPipe
from ..eval.training_fid import TrainingFID
from ..seeding import derive_seed, generator
from ..threads import configure_threads
from . import distributed, parallel
from .build import build_flow, build_objective, build_optimizer
from ..errors import CheckpointError, ConfigError, TrainingError
from .checkpoint import export_safetensors, latest_checkpoint, remove_stale_temporaries, save_checkpoint
from .config import Config, dump
from .ema import EMA
from .load import check_tensors
from .lock import RunLock
from .runlog import RunLog, plural

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class _StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits."""

    def __init__(self):
        self.raised = False
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.raised = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def per_rank_batch(cfg: Config, world: int) -> int:
    t = cfg.train
    if t.batch_size % (world * t.grad_accum):
        raise ConfigError(f"train.batch_size: {t.batch_size} is not divisible by {plural(world, 'rank')} x "
                          f"{plural(t.grad_accum, 'accumulation step')}")
    return t.batch_size // (world * t.grad_accum)


def train(cfg: Config, run_dir: str | Path, stop_after: int | None = None, on_step=None) -> dict:
    """Train (or resume) the run in `run_dir`.  Returns {'step', 'stopped', 'export', 'samples'}.

    on_step(step, flow), if given, is called after every optimizer step (tests use it).
    The run folder is locked for the whole call: a second trainer on it is refused.
    """
    env = distributed.setup(cfg.train.device)
    lock = _hold_run_dir(env, Path(run_dir))
    try:
        return _train(cfg, env, Path(run_dir), stop_after, on_step)
    finally:
        if lock is not None:
            lock.release()


def _hold_run_dir(env, run_dir: Path) -> RunLock | None:
    """Rank 0 takes the run folder's lock; if it cannot, every rank stops with its message."""
    lock, error = None, None
    if env.is_main:
        try:
            lock = RunLock(run_dir, warn=lambda m: print(m, file=sys.stderr, flush=True)).acquire()
        except ConfigError as e:
            error = str(e)
    error = distributed.all_gather_objects(env, error)[0]
    if error:
        distributed.teardown(env)
        raise ConfigError(error)
    return lock


def _train(cfg: Config, env, run_dir: Path, stop_after: int | None, on_step) -> dict:
    t = cfg.train
    per_rank = per_rank_batch(cfg, env.world)
    torch.backends.cuda.matmul.allow_tf32 = t.tf32
    torch.backends.cudnn.allow_tf32 = t.tf32
    log = RunLog(run_dir, enabled=env.is_main, tensorboard=t.tensorboard)

    # Model and EMA: identical initial weights on every rank; resumed weights load before sharding.
    data = make_dataset(cfg.data)
    fid = TrainingFID(cfg, data, env, run_dir, log) if t.fid_every else None  # its files fail here, not later
    torch.manual_seed(t.seed)
    flow = build_flow(cfg, data.sample_shape, data.num_classes).to(env.device)
    threads = configure_threads(t.threads, flow.net, env.device)
    ema = EMA(flow.net, t.ema_decay, t.ema_every, t.ema_float64)
    if env.is_main:  # holds the run folder's lock: a temporary file there is a killed writer's
        stale = remove_stale_temporaries(run_dir)
        if stale:
            log.info(f"removed {plural(len(stale), 'temporary file')} of interrupted writes ({stale[0].name}"
                     f"{', ...' if len(stale) > 1 else ''})")
    resumed = latest_checkpoint(run_dir, warn=log.warn if env.is_main else (lambda m: None),
                                quarantine=env.is_main)
    if resumed is not None:  # a checkpoint of another network is one line naming the settings that differ
        check_tensors(flow.net, resumed["net"], resumed["path"], resumed["config"], cfg.to_dict())
        check_tensors(ema.model, resumed["ema"], resumed["path"], resumed["config"], cfg.to_dict())
        flow.net.load_state_dict(resumed["net"])
        ema.load_state_dict(resumed["ema"])
    through_ddp = cfg.method != "meanflow"  # MeanFlow's JVP runs on the bare network
    net_call = parallel.wrap(flow.net, ema.model, env, fsdp=t.fsdp, compile=t.compile, ddp=through_ddp)
    optimizer = build_optimizer(cfg, flow.net.parameters())
    objective = build_objective(cfg)
    torch.manual_seed(derive_seed(t.seed, env.rank))  # noise, times, dropout differ per rank

    step = 0
    if resumed is not None:
        applied = []
        if resumed["optimizer"]:  # converted reference runs come without one
            parallel.load_optimizer(flow.net, optimizer, resumed["optimizer"])
            applied = _apply_optimizer_settings(optimizer)
        step = int(resumed["step"])
        rng = resumed["rng"]
        if len(rng) != env.world:
            if rng:
                log.warn(f"warning: checkpoint written by {plural(len(rng), 'rank')}, resuming on {env.world}: "
                         "random streams restart, so the run will not repeat an uninterrupted one exactly")
            torch.manual_seed(derive_seed(t.seed, env.rank, step))
        else:
            _set_rng_state(rng[env.rank], env.device)
        log.info(f"resumed from {resumed['path']} at step {step}")
        changed = _config_changes(resumed["config"], cfg.to_dict())
        if changed:
            log.warn(f"warning: config differs from the checkpoint's in {', '.join(changed)}")
        if applied:
            log.info(f"optimizer settings of the config applied over the checkpoint's: {', '.join(applied)}")
    log.save_config(dump(cfg))
    if cfg.data.name == "imagenet-latents" and not cfg.data.vae:
        log.warn("warning: no data.vae: latent sample grids are not decoded; set data.vae to see them")
    if env.device.type == "cpu":
        log.info(f"cpu: {threads} intra-op thread{'' if threads == 1 else 's'} per process (train.threads={t.threads})")

    dtype = AUTOCAST[t.precision]
    scaler = torch.amp.GradScaler(env.device.type, enabled=t.precision == "fp16")
    params = [p for p in flow.net.parameters() if p.requires_grad]

    stream = batches(data, t.seed, env.rank, env.world, per_rank, start=step * t.grad_accum,
                     num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor,
                     pin_memory=env.device.type == "cuda")
    augment = AugmentPipe(p=cfg.data.augment_p) if cfg.data.augment_p > 0 else None
    stop = _StopSignal()
    stop_flag = distributed.SharedFlag(env)
    first_bad = torch.full((), t.total_steps + 1, dtype=torch.long, device=env.device)
    totals, count, started, timer = {}, 0, step, time.perf_counter()
    last_saved = step if resumed is not None else None
    stopped = None
    try:
        progress = log.start(cfg, step, flow.net, env.device, env.world)
        while step < t.total_steps:
            flow.train()
            for micro in range(t.grad_accum):
                x0, labels = next(stream)
                x0 = x0.to(env.device, non_blocking=True)
                labels = None if labels is None else labels.to(env.device, non_blocking=True)
                augment_labels = None
                if augment is not None:  # EDM augmentation; its labels condition the network
                    x0, augment_labels = augment(x0, generator(t.seed, step, micro, env.rank, 2))
                sync = parallel.no_sync(net_call, last=micro == t.grad_accum - 1)
                autocast = torch.autocast(env.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
                with sync, autocast:
                    loss, stats = objective(flow, x0, labels, step=step, augment_labels=augment_labels, net=net_call)
                scaler.scale(loss / t.grad_accum).backward()
            if not through_ddp:
                parallel.average_gradients(params, env)
            scaler.unscale_(optimizer)
            grad_norm = parallel.local_tensor(torch.nn.utils.clip_grad_norm_(params, float("inf")))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            ema.update(flow.net, step)
            step += 1

            # Bookkeeping without host syncs: remember the first non-finite step, sum the stats.
            first_bad = torch.where(torch.isfinite(loss.detach()), first_bad, first_bad.clamp(max=step))
            for k, v in {"loss": loss.detach(), "grad_norm": grad_norm, **stats}.items():
                totals[k] = totals.get(k, 0) + v.float()
            count += 1
            progress.update(1)
            if on_step is not None:
                on_step(step, flow)

            fid_due = fid is not None and fid.due(step, t.total_steps)
            boundary = step % t.log_every == 0 or step % t.checkpoint_every == 0 or step == t.total_steps or fid_due
            halt = stop_after is not None and step - started >= stop_after and step < t.total_steps
            signalled = stop_flag.poll(stop.raised)
            if boundary or halt or signalled:
                _check_finite(first_bad, t.total_steps, last_saved, run_dir)
            if step % t.log_every == 0 or step == t.total_steps:
                elapsed = time.perf_counter() - timer
                schedule = {"r": objective.ratio(step - 1)} if hasattr(objective, "ratio") else {}
                log.metrics(step, _averaged(env, totals, count), **schedule, samples_per_s=count * t.batch_size / elapsed,
                            **_peak_memory_gb(env.device))
                totals, count, timer = {}, 0, time.perf_counter()
            if step % t.checkpoint_every == 0 or step == t.total_steps or halt or signalled:
                _save(env, run_dir, cfg, flow, ema, optimizer, step)
                last_saved = step
            if fid_due and not signalled:  # a stop request should not wait for thousands of samples
                fid.evaluate(step, flow, ema)
            if t.sample_every and step % t.sample_every == 0 and step < t.total_steps:
                write_previews(cfg, ema_flow(cfg, ema), data, run_dir / "samples", step, log, env)
            if halt or signalled:
                stopped = "signal" if signalled else "stop-after"
                log.info(f"stopped at step {step} ({'signal' if signalled else '--stop-after'}); "
                         f"checkpoint saved, rerun the same command to resume")
                break
        progress.close()
        result = {"step": step, "stopped": stopped}
        if stopped is None:
            ema_state, _ = parallel.full_state(ema.model)
            if env.is_main:
                result["export"] = str(export_safetensors(run_dir / "exports" / f"ema-{step:08d}.safetensors",
                                                          ema_state, cfg.to_dict(), step, data.sample_shape,
                                                          flow.num_classes))
            paths = write_previews(cfg, ema_flow(cfg, ema), data, run_dir / "samples", step, log, env)
            result["samples"] = [str(p) for p in paths]
        return result
    finally:
        stop.restore()
        log.close()
        distributed.teardown(env)


def ema_flow(cfg: Config, ema: EMA):
    """The EMA network as a SolutionFlow (for sampling)."""
    from ..solution import SolutionFlow

    return SolutionFlow(ema.model, cfg.model.path, cfg.model.parameterization)


def _check_finite(first_bad: torch.Tensor, total: int, last_saved, run_dir: Path) -> None:
    bad = int(first_bad.item())
    if bad <= total:
        where = (f"the last good checkpoint is step {last_saved} in {run_dir / 'checkpoints'}"
                 if last_saved is not None else "no checkpoint was written")  # step 0 is a checkpoint too
        raise TrainingError(f"non-finite loss at step {bad}; stopped without saving; {where}")


def _averaged(env, totals: dict, count: int) -> dict:
    if not totals:
        return {}
    keys = sorted(totals)
    values = distributed.mean_over_ranks(env, torch.stack([totals[k] for k in keys]) / count)
    return dict(zip(keys, values.tolist()))


def _peak_memory_gb(device: torch.device) -> dict:
    """Peak memory under a name that says what was measured: the tensors allocated on the CUDA
    device, or the resident set of the whole process (ru_maxrss, kB on Linux) on CPU."""
    if device.type == "cuda":
        return {"peak_cuda_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# Optimizer settings that come from the config: train.lr, train.betas, train.weight_decay, and
# train.optimizer (AdamW decouples its weight decay, RAdam does not).
CONFIGURED = ("lr", "betas", "weight_decay", "decoupled_weight_decay")


def _apply_optimizer_settings(optimizer) -> list[str]:
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


def _save(env, run_dir, cfg, flow, ema, optimizer, step) -> None:
    rng = distributed.all_gather_objects(env, _rng_state(env.device))
    net_state, optimizer_state = parallel.full_state(flow.net, optimizer)
    ema_state, _ = parallel.full_state(ema.model)
    failed = None
    if env.is_main:
        state = {"step": step, "config": cfg.to_dict(), "sample_shape": list(flow.net.sample_shape),
                 "num_classes": flow.num_classes, "net": net_state, "ema": ema_state, "optimizer": optimizer_state,
                 "rng": [{k: v.cpu() for k, v in r.items()} for r in rng], "world_size": env.world}
        try:
            save_checkpoint(run_dir, state, cfg.train.keep_last, cfg.train.keep_every)
        except CheckpointError as e:
            failed = str(e)
    failed = distributed.all_gather_objects(env, failed)[0]  # also the barrier: every rank stops on a failed write
    if failed:
        raise CheckpointError(failed)


def _config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(prefix + k)
    return out


def write_previews(cfg: Config, flow, data, folder: Path, step: int, log, env) -> list[Path]:
    """EMA samples with fixed seeds at each configured NFE: a scatter plot for 2-D data, an image
    grid (one row per class) otherwise.  Sharded models sample on every rank; rank 0 writes."""
    from ..plots import image_grid, sample_title, scatter_panels
    from ..writers import write_figure

    if not (env.is_main or parallel.is_sharded(flow.net)):
        return []
    seed, k = cfg.train.seed, data.num_classes
    if len(data.sample_shape) == 1:
        n = cfg.train.sample_num
        panels = {"data": data.reference(n)}
        panels.update({sample_title(cfg.method, nfe): generate(cfg.method, flow, n, nfe, seed=seed)[:, :2].cpu()
                       for nfe in cfg.train.sample_nfe})
        paths = [write_figure(folder / f"step{step:08d}.png", scatter_panels, panels,
                              title=f"step {step}, EMA weights")] if env.is_main else []
    else:
        classes = torch.linspace(0, k - 1, min(k, 10)).round().long() if k else None  # at most 10 rows
        labels = classes.repeat_interleave(10) if k else None
        n = len(labels) if k else 64
        grids = {nfe: generate(cfg.method, flow, n, nfe, seed=seed, labels=labels) for nfe in cfg.train.sample_nfe}
        if cfg.data.name == "imagenet-latents":
            if not cfg.data.vae:
                return []  # no decoder: nothing to look at (_train said so once at start)
            from ..data.latents import decode, load_vae

            vae = load_vae(cfg.data.vae, next(flow.parameters()).device)
            grids = {nfe: decode(vae, x) for nfe, x in grids.items()}
        paths = [write_figure(folder / f"step{step:08d}-nfe{nfe}.png", image_grid, x,
                              rows=len(classes) if k else None,
                              title=sample_title(cfg.method, nfe, step=step, weights="ema"))
                 for nfe, x in grids.items()] if env.is_main else []
    for p in paths:
        log.samples(p)
    return paths
