"""The `soflow` commands other than `sample` (soflow.cli.sample): each takes the parsed arguments
and returns the exit status."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..run.config import Config


def cmd_train(args: argparse.Namespace) -> int:
    """`soflow train`: train or resume the run in --run-dir."""
    from ..run.config import dump, load
    from ..run.folder import check_run_dir
    from ..run.presets import read_yaml
    from ..train.loop import train

    run_dir = Path(args.run_dir)
    saved = run_dir / "config.yaml"
    if args.config is None and not saved.is_file():
        raise ConfigError("--config is required for a new run (a preset name or a YAML file)")
    base = read_yaml(str(saved)) if args.config is None else None
    cfg = load(args.config, args.set, base=base)
    check_init(cfg, run_dir)
    if args.dry_run:
        print(dump(cfg), end="")
        return 0
    if args.stop_after is not None and args.stop_after < 1:
        raise ConfigError(f"--stop-after must be >= 1, got {args.stop_after}")
    check_run_dir(run_dir)  # a read-only checkpoints/ would otherwise fail at the first save, after training
    result = train(cfg, run_dir, stop_after=args.stop_after)  # the run log already named the sample figures
    if result.get("export"):
        print(f"EMA weights exported to {Path(result['export']).resolve()}")
    return 0


def check_init(cfg: Config, run_dir: Path) -> None:
    """train.init must exist when it will be read: in a run folder without checkpoints yet."""
    from ..run.checkpoint import list_checkpoints

    if cfg.train.init and not list_checkpoints(run_dir) and not Path(cfg.train.init).exists():
        raise ConfigError(f"train.init: {cfg.train.init} does not exist; give a run folder, checkpoint, "
                          ".safetensors export, pipeline folder or SiT checkpoint to start from")


def cmd_fid(args: argparse.Namespace) -> int:
    """`soflow fid ref | calc`: write reference statistics, or score images against them."""
    import json

    from ..eval.run import fid_against_reference, fid_reference

    opts = dict(weights=args.inception_weights, device=args.device, batch_size=args.batch_size,
                data_path=args.data_path, dims=args.dims, prc=args.prc, sfid=args.sfid)
    if args.fid_command == "ref":
        out, n = fid_reference(args.images, args.out, **opts)
        print(f"statistics of {n} image{'' if n == 1 else 's'} written to {out}")
        return 0
    result = fid_against_reference(args.images, args.ref, with_is=args.inception_score, **opts)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """`soflow eval points | fmnist`: score a trained run and print the result as JSON."""
    import json
    import math

    from ..eval.run import eval_fmnist, eval_points
    from ..run.folder import unwritable
    from .sample import check_seed

    # The arguments are checked before a model is loaded or a sample drawn.
    count = ("--num", args.num) if args.eval_command == "points" else ("--per-class", args.per_class)
    for flag, value in (("--nfe", args.nfe), count):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    check_seed(args.seed)
    if args.eval_command == "fmnist" and args.guidance is not None and not math.isfinite(args.guidance):
        raise ConfigError(f"--guidance must be a finite number, got {args.guidance}")
    problem = unwritable(Path(args.json).parent) if args.json else None
    if problem:
        raise ConfigError(f"--json {args.json}: cannot write there: {problem}")
    warn = lambda m: print(m, file=sys.stderr)
    if args.eval_command == "points":
        result = eval_points(args.checkpoint, args.nfe, args.num, args.seed, warn=warn)
    else:
        result = eval_fmnist(args.checkpoint, args.nfe, args.per_class, args.seed, args.data_path, warn=warn,
                             guidance=args.guidance)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def cmd_encode_latents(args: argparse.Namespace) -> int:
    """`soflow encode-latents`: encode an image folder to SD-VAE latents."""
    from ..data.images import ImageFolder
    from ..data.vae import encode_latents
    from ..distributed import setup, teardown

    env = setup(args.device or "auto")
    try:
        images = ImageFolder(args.data, args.resolution)
        n = encode_latents(images, args.vae, args.out, env.rank, env.world, args.shard_size, args.batch_size,
                           env.device, log=print if env.is_main else (lambda m: None))
    finally:
        teardown(env)
    print(f"rank {env.rank}: encoded {n} shard(s) into {args.out}")
    return 0


def cmd_convert_reference(args: argparse.Namespace) -> int:
    """`soflow convert-reference`: a run folder from a reference checkpoint and its YAML."""
    from ..reference import convert_reference_run

    out = convert_reference_run(args.checkpoint, args.config, args.out)
    print(f"converted into run folder {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A run as a pipeline folder in the Hub layout (Pipeline.save_pretrained)."""
    from ..pipeline import Pipeline
    from ..run.folder import unwritable

    problem = unwritable(args.out)
    if problem:
        raise ConfigError(f"--out {args.out}: cannot write there: {problem}")
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: the folder is not empty; give a new or empty folder")
    pipe = Pipeline.from_pretrained(args.checkpoint, weights=args.weights, vae=args.vae,
                                    warn=lambda m: print(m, file=sys.stderr))
    pipe.save_pretrained(out, grid=not args.no_grid)
    print(f"pipeline ({pipe.config.method}, step {pipe.step}) written to {out.resolve()}")
    return 0
