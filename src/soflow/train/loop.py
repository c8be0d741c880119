"""The training loop, read top to bottom: set-up, resume, steps, checkpoints, samples.

Exact resume: the data of a step is a function of (seed, rank, step), and a checkpoint holds the
model, EMA, optimizer, step and every rank's RNG states, so a run stopped and restarted ends
with the weights of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import distributed
from ..data import make_dataset, traits
from ..data.augment import AugmentPipe
from ..data.stream import batches
from ..errors import ConfigError, TrainingError
from ..methods import method
from ..pipeline import Pipeline
from ..protocols import Dataset, Objective
from ..run.build import AUTOCAST, build_flow, build_objective, build_optimizer, solution_flow
from ..run.checkpoint import export_safetensors, latest_checkpoint, remove_stale_temporaries
from ..run.config import Config, dump
from ..run.init import initial_weights, weights_sha256
from ..run.load import check_tensors
from ..seeding import derive_seed, generator
from ..solution import SolutionFlow
from ..threads import configure_threads
from . import parallel
from .ema import EMA
from .lock import RunLock
from .previews import write_previews
from .state import resume, save_run_state
from .runlog import RunLog, plural
from .stats import RunningStats, peak_memory_gb
from .training_fid import TrainingFID


class _StopSignal:
    """`with _StopSignal() as stop:` SIGTERM/SIGINT set `stop.raised`; the loop saves at the next step
    boundary and exits.  The former handlers come back when the block ends."""

    def __enter__(self):
        self.raised = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def per_rank_batch(cfg: Config, world: int) -> int:
    """The micro-batch of each rank: train.batch_size over ranks and accumulation steps (ConfigError if not whole)."""
    t = cfg.train
    if t.batch_size % (world * t.grad_accum):
        raise ConfigError(f"train.batch_size: {t.batch_size} is not divisible by {plural(world, 'rank')} x "
                          f"{plural(t.grad_accum, 'accumulation step')}")
    return t.batch_size // (world * t.grad_accum)


def train(cfg: Config, run_dir: str | Path, stop_after: int | None = None,
          on_step: Callable[[int, SolutionFlow], None] | None = None) -> dict:
    """Train (or resume) the run in `run_dir`.  Returns {'step', 'stopped', 'export', 'samples'}.

    on_step(step, flow), if given, is called after every optimizer step (tests use it).
    The run folder is locked for the whole call: a second trainer on it is refused.
    """
    env = distributed.setup(cfg.train.device)
    # from before the lock on: a signal while the run is set up stops it at the first step boundary
    with _StopSignal() as stop:
        lock = _hold_run_dir(env, Path(run_dir))
        try:
            return _train(cfg, env, Path(run_dir), stop_after, on_step, stop)
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


@dataclass
class Run:
    """What a training run holds between optimizer steps; `step` and `last_saved` advance."""

    cfg: Config
    env: distributed.Env
    run_dir: Path
    log: RunLog
    data: Dataset
    fid: TrainingFID | None
    flow: object  # SolutionFlow; flow.net is the bare (possibly sharded) network
    ema: EMA
    net_call: object  # what the objective calls: DDP/FSDP/compiled wrapper of flow.net
    through_ddp: bool
    optimizer: torch.optim.Optimizer
    objective: Objective
    scaler: torch.amp.GradScaler
    params: list
    stream: object
    augment: AugmentPipe | None
    preview: Pipeline  # the EMA network, for sample figures
    step: int
    last_saved: int | None  # step of the newest checkpoint of this run; None before the first


def _train(cfg: Config, env, run_dir: Path, stop_after: int | None, on_step, stop: _StopSignal) -> dict:
    run = _set_up(cfg, env, run_dir)
    total, started, stopped = cfg.train.total_steps, run.step, None
    stop_flag = distributed.SharedFlag(env)
    stats = RunningStats(total, cfg.train.batch_size, env.device)
    try:
        progress = run.log.start(cfg, run.step, run.flow.net, env.device, env.world)
        while run.step < total and stopped is None:
            loss, step_stats, grad_norm = _optimizer_step(run)
            run.step += 1
            stats.add(run.step, loss, grad_norm, step_stats)
            progress.update(1)
            if on_step is not None:
                on_step(run.step, run.flow)
            # a --stop-after that lands on the last step finishes the run (export and samples)
            halt = stop_after is not None and run.step - started >= stop_after and run.step < total
            stopped = _at_boundary(run, stats, halt, signalled=stop_flag.poll(stop.raised))
        progress.close()
        return _finish(run, stopped)
    finally:
        run.log.close()
        distributed.teardown(env)


def _set_up(cfg: Config, env, run_dir: Path) -> Run:
    """Data, model, EMA, resume, optimizer and data stream.  The order matters for exact resume:
    the initial weights come from train.seed, then each rank's own random stream (or the
    checkpoint's) takes over before the first batch is drawn."""
    t = cfg.train
    per_rank = per_rank_batch(cfg, env.world)
    torch.backends.cuda.matmul.allow_tf32 = t.tf32
    torch.backends.cudnn.allow_tf32 = t.tf32
    log = RunLog(run_dir, enabled=env.is_main, tensorboard=t.tensorboard)
    data = make_dataset(cfg.data)
    fid = TrainingFID(cfg, data, env, run_dir, log) if t.fid_every else None  # its files fail here, not later
    flow, ema, threads, resumed = _build_models(cfg, env, run_dir, log, data)
    through_ddp = method(cfg.method).through_ddp
    net_call = parallel.wrap(flow.net, ema.model, env, fsdp=t.fsdp, compile=t.compile, ddp=through_ddp)
    optimizer = build_optimizer(cfg, flow.net.parameters())
    objective = build_objective(cfg)
    torch.manual_seed(derive_seed(t.seed, env.rank))  # noise, times, dropout differ per rank
    step = 0 if resumed is None else resume(cfg, env, log, optimizer, resumed, flow)
    _announce(cfg, env, log, threads)
    scaler = torch.amp.GradScaler(env.device.type, enabled=t.precision == "fp16")
    params = [p for p in flow.net.parameters() if p.requires_grad]
    stream = batches(data, t.seed, env.rank, env.world, per_rank, start=step * t.grad_accum,
                     num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor,
                     pin_memory=env.device.type == "cuda")
    augment = AugmentPipe(p=cfg.data.augment_p) if cfg.data.augment_p > 0 else None
    return Run(cfg=cfg, env=env, run_dir=run_dir, log=log, data=data, fid=fid, flow=flow, ema=ema,
               net_call=net_call, through_ddp=through_ddp, optimizer=optimizer, objective=objective,
               scaler=scaler, params=params, stream=stream, augment=augment, step=step,
               preview=Pipeline(solution_flow(cfg, ema.model), cfg),
               last_saved=step if resumed is not None else None)


def _build_models(cfg: Config, env, run_dir: Path, log: RunLog, data):
    """The network and its EMA with identical initial weights on every rank; the newest usable
    checkpoint's weights load here, before sharding.  Returns (flow, ema, threads, resumed)."""
    t = cfg.train
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
        t.init_sha256 = t.init_sha256 or resumed["config"].get("train", {}).get("init_sha256")
    elif t.init:
        _start_from(cfg, flow, ema, log)
    return flow, ema, threads, resumed


def _start_from(cfg: Config, flow: SolutionFlow, ema: EMA, log: RunLog) -> None:
    """train.init: the online network and its EMA both take the source's EMA weights; the step,
    optimizer and schedules start from 0.  The config records the weights' sha256."""
    t = cfg.train
    state, kind = initial_weights(t.init, flow.net)
    digest = weights_sha256(state)
    if t.init_sha256 and t.init_sha256 != digest:
        raise ConfigError(f"train.init_sha256: the weights of {t.init} hash to {digest}, not {t.init_sha256}; "
                          "the file changed since the config was written (drop train.init_sha256 to accept it)")
    t.init_sha256 = digest
    flow.net.load_state_dict(state)
    ema.load_state_dict(flow.net.state_dict())
    log.info(f"initial weights from {t.init}: {kind}, sha256 {digest[:16]}")


def _announce(cfg: Config, env, log: RunLog, threads: int) -> None:
    """The run's config file, and the start-up notes that hold for the whole run."""
    log.save_config(dump(cfg))
    if traits(cfg.data.name).latent and not cfg.data.vae:
        log.warn("warning: no data.vae: latent sample grids are not decoded; set data.vae to see them")
    if env.device.type == "cpu":
        t = cfg.train
        log.info(f"cpu: {threads} intra-op thread{'' if threads == 1 else 's'} per process (train.threads={t.threads})")


def _optimizer_step(run: Run):
    """One optimizer step at run.step: train.grad_accum micro-batches (DDP syncs gradients on the
    last only), gradients averaged by hand where the network runs outside DDP, the norm measured
    (and clipped to train.grad_clip where set), the scaler's step and the EMA update.  Returns
    (loss, stats, grad_norm before clipping) of the last micro-batch, all device tensors."""
    t, step = run.cfg.train, run.step
    dtype = AUTOCAST[t.precision]
    run.flow.train()
    for micro in range(t.grad_accum):
        x0, labels, augment_labels = _next_batch(run, micro)
        sync = parallel.no_sync(run.net_call, last=micro == t.grad_accum - 1)
        autocast = torch.autocast(run.env.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with sync, autocast:
            loss, stats = run.objective(run.flow, x0, labels, step=step, augment_labels=augment_labels,
                                        net=run.net_call)
        run.scaler.scale(loss / t.grad_accum).backward()
    if not run.through_ddp:
        parallel.average_gradients(run.params, run.env)
    run.scaler.unscale_(run.optimizer)
    max_norm = float("inf") if t.grad_clip is None else t.grad_clip  # returns the norm before clipping
    grad_norm = parallel.local_tensor(torch.nn.utils.clip_grad_norm_(run.params, max_norm))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.ema.update(run.flow.net, step)
    return loss, stats, grad_norm


def _next_batch(run: Run, micro: int):
    """The next micro-batch on the device: (x0, labels, augment_labels)."""
    x0, labels = next(run.stream)
    x0 = x0.to(run.env.device, non_blocking=True)
    labels = None if labels is None else labels.to(run.env.device, non_blocking=True)
    augment_labels = None
    if run.augment is not None:  # EDM augmentation; its labels condition the network
        x0, augment_labels = run.augment(x0, generator(run.cfg.train.seed, run.step, micro, run.env.rank, 2))
    return x0, labels, augment_labels


def _at_boundary(run: Run, stats: RunningStats, halt: bool, signalled: bool) -> str | None:
    """After the optimizer step that reached run.step: the finite check, metrics, checkpoint, FID
    and previews that are due.  Returns why the run stops ('signal', 'stop-after') or None."""
    t, step = run.cfg.train, run.step
    fid_due = run.fid is not None and run.fid.due(step, t.total_steps)
    boundary = step % t.log_every == 0 or step % t.checkpoint_every == 0 or step == t.total_steps or fid_due
    if boundary or halt or signalled:  # the only host sync on the loss: never save a non-finite model
        _check_finite(stats.first_bad, t.total_steps, run.last_saved, run.run_dir)
    if step % t.log_every == 0 or step == t.total_steps:
        schedule = method(run.cfg.method).logged(run.objective, step - 1)
        means = stats.flush(run.env)
        samples_per_s = means.pop("samples_per_s")
        run.log.metrics(step, means, **schedule, samples_per_s=samples_per_s, **peak_memory_gb(run.env.device))
    if step % t.checkpoint_every == 0 or step == t.total_steps or halt or signalled:
        save_run_state(run.env, run.run_dir, run.cfg, run.flow, run.ema, run.optimizer, step)
        run.last_saved = step
    if fid_due and not signalled:  # a stop request should not wait for thousands of samples
        run.fid.evaluate(step, run.flow, run.ema)
    if t.sample_every and step % t.sample_every == 0 and step < t.total_steps:
        write_previews(run.preview, run.data, run.run_dir / "samples", step, run.log, run.env)
    if not (halt or signalled):
        return None
    run.log.info(f"stopped at step {step} ({'signal' if signalled else '--stop-after'}); "
                 f"checkpoint saved, rerun the same command to resume")
    return "signal" if signalled else "stop-after"


def _finish(run: Run, stopped: str | None) -> dict:
    """The result of train(); a run that reached total_steps also exports its EMA weights and
    writes the final samples."""
    result = {"step": run.step, "stopped": stopped}
    if stopped is None:
        ema_state, _ = parallel.full_state(run.ema.model)
        if run.env.is_main:
            result["export"] = str(export_safetensors(
                run.run_dir / "exports" / f"ema-{run.step:08d}.safetensors", ema_state, run.cfg.to_dict(), run.step,
                run.data.sample_shape, run.flow.num_classes))
        paths = write_previews(run.preview, run.data, run.run_dir / "samples", run.step, run.log, run.env)
        result["samples"] = [str(p) for p in paths]
    return result


def _check_finite(first_bad: torch.Tensor, total: int, last_saved, run_dir: Path) -> None:
    bad = int(first_bad.item())
    if bad <= total:
        where = (f"the last good checkpoint is step {last_saved} in {run_dir / 'checkpoints'}"
                 if last_saved is not None else "no checkpoint was written")  # step 0 is a checkpoint too
        raise TrainingError(f"non-finite loss at step {bad}; stopped without saving; {where}")
