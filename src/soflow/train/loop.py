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

import torch

from ..data import make_dataset
from ..data.stream import batches
from ..sampling import generate
from ..data.augment import AugmentPipe
from ..eval.training_fid import TrainingFID
from ..seeding import derive_seed, generator
from ..threads import configure_threads
from .. import distributed
from . import parallel
from ..run.build import build_flow, build_objective, build_optimizer
from ..errors import CheckpointError, ConfigError, TrainingError
from ..run.checkpoint import (export_safetensors, latest_checkpoint, remove_stale_temporaries, run_state,
                         save_checkpoint)
from ..run.config import Config, dump
from .ema import EMA
from ..run.load import check_tensors
from .lock import RunLock
from .runlog import RunLog, plural
from .stats import RunningStats

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


@dataclass
class Run:
    """What a training run holds between optimizer steps; `step` and `last_saved` advance."""

    cfg: Config
    env: distributed.Env
    run_dir: Path
    log: RunLog
    data: object
    fid: TrainingFID | None
    flow: object  # SolutionFlow; flow.net is the bare (possibly sharded) network
    ema: EMA
    net_call: object  # what the objective calls: DDP/FSDP/compiled wrapper of flow.net
    through_ddp: bool
    optimizer: torch.optim.Optimizer
    objective: object
    scaler: torch.amp.GradScaler
    params: list
    stream: object
    augment: AugmentPipe | None
    step: int
    last_saved: int | None  # step of the newest checkpoint of this run; None before the first


def _train(cfg: Config, env, run_dir: Path, stop_after: int | None, on_step) -> dict:
    run = _set_up(cfg, env, run_dir)
    total, started, stopped = cfg.train.total_steps, run.step, None
    stop, stop_flag = _StopSignal(), distributed.SharedFlag(env)
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
        stop.restore()
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
    through_ddp = cfg.method != "meanflow"  # MeanFlow's JVP runs on the bare network
    net_call = parallel.wrap(flow.net, ema.model, env, fsdp=t.fsdp, compile=t.compile, ddp=through_ddp)
    optimizer = build_optimizer(cfg, flow.net.parameters())
    objective = build_objective(cfg)
    torch.manual_seed(derive_seed(t.seed, env.rank))  # noise, times, dropout differ per rank
    step = 0 if resumed is None else _resume(cfg, env, log, optimizer, resumed, flow)
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
    return flow, ema, threads, resumed


def _resume(cfg: Config, env, log: RunLog, optimizer, resumed: dict, flow) -> int:
    """Optimizer state, step and this rank's random state from the checkpoint; returns the step."""
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
        torch.manual_seed(derive_seed(cfg.train.seed, env.rank, step))
    else:
        _set_rng_state(rng[env.rank], env.device)
    log.info(f"resumed from {resumed['path']} at step {step}")
    changed = _config_changes(resumed["config"], cfg.to_dict())
    if changed:
        log.warn(f"warning: config differs from the checkpoint's in {', '.join(changed)}")
    if applied:
        log.info(f"optimizer settings of the config applied over the checkpoint's: {', '.join(applied)}")
    return step


def _announce(cfg: Config, env, log: RunLog, threads: int) -> None:
    """The run's config file, and the start-up notes that hold for the whole run."""
    log.save_config(dump(cfg))
    if cfg.data.name == "imagenet-latents" and not cfg.data.vae:
        log.warn("warning: no data.vae: latent sample grids are not decoded; set data.vae to see them")
    if env.device.type == "cpu":
        t = cfg.train
        log.info(f"cpu: {threads} intra-op thread{'' if threads == 1 else 's'} per process (train.threads={t.threads})")


def _optimizer_step(run: Run):
    """One optimizer step at run.step: train.grad_accum micro-batches (DDP syncs gradients on the
    last only), gradients averaged by hand where the network runs outside DDP, the norm measured
    (no clipping), the scaler's step and the EMA update.  Returns (loss, stats, grad_norm) of the
    last micro-batch, all device tensors."""
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
    grad_norm = parallel.local_tensor(torch.nn.utils.clip_grad_norm_(run.params, float("inf")))
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
        schedule = {"r": run.objective.ratio(step - 1)} if hasattr(run.objective, "ratio") else {}
        means = stats.flush(run.env)
        samples_per_s = means.pop("samples_per_s")
        run.log.metrics(step, means, **schedule, samples_per_s=samples_per_s, **_peak_memory_gb(run.env.device))
    if step % t.checkpoint_every == 0 or step == t.total_steps or halt or signalled:
        _save(run.env, run.run_dir, run.cfg, run.flow, run.ema, run.optimizer, step)
        run.last_saved = step
    if fid_due and not signalled:  # a stop request should not wait for thousands of samples
        run.fid.evaluate(step, run.flow, run.ema)
    if t.sample_every and step % t.sample_every == 0 and step < t.total_steps:
        write_previews(run.cfg, ema_flow(run.cfg, run.ema), run.data, run.run_dir / "samples", step, run.log, run.env)
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
        paths = write_previews(run.cfg, ema_flow(run.cfg, run.ema), run.data, run.run_dir / "samples", run.step,
                               run.log, run.env)
        result["samples"] = [str(p) for p in paths]
    return result


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
        state = run_state(step, cfg.to_dict(), flow.net.sample_shape, flow.num_classes, net_state, ema_state,
                          optimizer_state, [{k: v.cpu() for k, v in r.items()} for r in rng], env.world)
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
