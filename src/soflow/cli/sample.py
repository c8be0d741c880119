"""`soflow sample`: samples of a trained run, over all torchrun ranks, into one output file."""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError, SoflowError

MAX_NFE = 10_000  # steps per sample (Heun: 2 steps - 1 evaluations); flow matching's finest ODE grids use about 1000


def cmd_sample(args: argparse.Namespace) -> int:
    """Rank r draws a contiguous range of whole batches (per-sample seeds make the result independent
    of the number of ranks) and streams them, batch by batch, into its part of the output; rank 0 then
    assembles the parts.  A rank holds one batch of float samples at a time, whatever --num."""
    from .. import distributed
    from ..plots import plural

    from ..train.lock import OutputLock

    check_arguments(args)  # before a model is loaded, so that a wrong value costs no wait
    with _sigterm_unwinds(args.out):
        env = distributed.setup(args.device or "auto")
        output = None
        try:
            # one writer per output (rank 0 for all ranks); torchrun stops the others if it is refused
            with OutputLock(args.out, warn=lambda m: None) if env.is_main else contextlib.nullcontext():
                pipe = _open(args, env)
                output = _output(args, pipe, env)
                _write_parts(args, pipe, output, env)
                if env.is_main:
                    out = output.assemble()
                    print(f"{plural(args.num, 'sample')} ({pipe.config.method}, {output.title}) written to "
                          f"{Path(out).resolve()}")
        finally:
            if output is not None and env.is_main:
                output.discard()
            distributed.teardown(env)
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    """Check the `soflow sample` arguments before a model is opened (one ConfigError line)."""
    from ..distributed import DEVICES
    from ..run.folder import too_long, unwritable
    from ..writers import OUT_NAME_EXTRA

    if str(args.device or "auto").lower() not in DEVICES:
        raise ConfigError(f"--device {args.device}: choose one of {', '.join(DEVICES)}")
    for flag, value in (("--num", args.num), ("--nfe", args.nfe), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.nfe > MAX_NFE:
        raise ConfigError(f"--nfe {args.nfe}: at most {MAX_NFE} steps per sample")
    check_seed(args.seed)
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise ConfigError(f"--guidance must be a finite number, got {args.guidance}")
    problem = too_long(args.out, extra=OUT_NAME_EXTRA) or unwritable(Path(args.out).parent)
    if problem:
        raise ConfigError(f"--out {args.out}: cannot write there: {problem}")


def check_seed(seed: int) -> None:
    """Refuse a negative --seed."""
    if seed < 0:
        raise ConfigError(f"--seed must be 0 or more, got {seed}")


@contextmanager
def _sigterm_unwinds(out):
    """torchrun ends the other ranks with SIGTERM: unwind, so that temporary files go, and say so."""
    def stop(signum, frame):
        print(f"soflow sample: stopped by signal {signum}; nothing was written to {out} (an existing {out} is "
              "kept as it was) and the partial samples were removed", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _open(args, env):
    """The run as a Pipeline on this rank's device, with the sampling arguments checked against it."""
    import torch

    from ..pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.checkpoint, weights=args.weights, device=env.device, vae=args.vae,
                                    warn=lambda m: print(m, file=sys.stderr) if env.is_main else None)
    if env.device.type == "cuda":  # as in training and the reference's sampling (train.tf32, default on)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(pipe.config.train.tf32)
    if args.class_id is not None and not pipe.flow.num_classes:
        raise ConfigError(f"--class {args.class_id}: the model is unconditional; leave --class out")
    if args.class_id is not None and not 0 <= args.class_id < pipe.flow.num_classes:
        raise ConfigError(f"--class {args.class_id}: the model's classes are 0 to {pipe.flow.num_classes - 1}")
    problem = pipe.guidance_problem(args.guidance)
    if problem:
        raise ConfigError(f"--guidance {args.guidance}: {problem}")
    pipe.method.mode(args.mode)  # one line if the method has no such sampler
    return pipe


def _output(args, pipe, env):
    from .. import distributed
    from ..plots import sample_title
    from ..writers import SampleOutput

    token = distributed.all_gather_objects(env, uuid.uuid4().hex[:12])[0]  # rank 0's names the temporaries
    title = sample_title(pipe.config.method, args.nfe, args.mode, pipe.step, args.guidance, args.weights,
                         args.class_id)
    output = SampleOutput(args.out, pipe.flow.net.sample_shape, args.num, env.world, args.batch_size, token, title)
    output.check_destination()
    output.check_space()
    if pipe.is_latent and output.kind != "npy":  # a missing VAE is one line before any sample is drawn
        _ = pipe.vae
    return output


def _write_parts(args, pipe, output, env) -> None:
    """This rank's samples into its part file; every rank reaches the gather, so that one rank's
    failure stops all of them with one message instead of leaving the others waiting."""
    from .. import distributed

    failure = None
    try:
        first, last = output.range(env.rank)
        with output.writer(env.rank) as part:
            # .npy keeps the raw latents of a latent model; the other outputs hold decoded images
            for x in pipe.chunks(first, last, args.nfe, decode=output.kind != "npy", mode=args.mode,
                                 seed=args.seed, labels=args.class_id, guidance=args.guidance,
                                 batch_size=args.batch_size):
                part.write(x)
    except Exception as e:
        failure = e
    reports = distributed.all_gather_objects(env, None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    failed = [(r, m) for r, m in enumerate(reports) if m]
    if failed:  # the failing rank prints its own error; this one only says that nothing was written
        raise SoflowError(f"rank {failed[0][0]} failed ({failed[0][1]}); nothing was written to {args.out}")
