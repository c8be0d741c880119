"""`soflow` command line: train, sample, convert-reference."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path



def _errors():
    from .data import DataError
    from .reference import CheckpointError as ReferenceError
    from .train.checkpoint import CheckpointError
    from .train.config import ConfigError
    from .train.loop import TrainingError

    return (ConfigError, DataError, CheckpointError, ReferenceError, TrainingError, FileNotFoundError)


def cmd_train(args) -> int:
    from .train.config import ConfigError, dump, load, read_yaml
    from .train.loop import train

    run_dir = Path(args.run_dir)
    saved = run_dir / "config.yaml"
    if args.config is None and not saved.is_file():
        raise ConfigError("--config is required for a new run (a preset name or a YAML file)")
    base = read_yaml(str(saved)) if args.config is None else None
    cfg = load(args.config, args.set, base=base)
    if args.dry_run:
        print(dump(cfg), end="")
        return 0
    if args.stop_after is not None and args.stop_after < 1:
        raise ConfigError(f"--stop-after must be >= 1, got {args.stop_after}")
    result = train(cfg, run_dir, stop_after=args.stop_after)
    for path in result.get("samples", []):
        print(f"samples written to {path}")
    if result.get("export"):
        print(f"EMA weights exported to {result['export']}")
    return 0


def cmd_sample(args) -> int:
    import torch

    from .sampling import sample
    from .train.load import load_run
    from .writers import write_samples

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg, flow, step = load_run(args.checkpoint, args.weights, device=device,
                               warn=lambda m: print(m, file=sys.stderr))
    labels = args.class_id
    if labels is not None and not flow.num_classes:
        raise ValueError("--class given but the model is unconditional")
    x = sample(flow, args.num, nfe=args.nfe, seed=args.seed, labels=labels, mode=args.mode,
               guidance=args.guidance, batch_size=args.batch_size)
    if cfg.data.name == "imagenet-latents" and not str(args.out).endswith(".npy"):
        from .data.latents import decode, load_vae

        x = decode(load_vae(args.vae or cfg.data.vae, device), x)
    out = write_samples(args.out, x)
    print(f"{args.num} samples ({args.nfe}-NFE, {args.mode}, step {step}) written to {out}")
    return 0


def cmd_encode_latents(args) -> int:
    from .data.images import ImageFolder
    from .data.latents import encode_latents
    from .train.distributed import setup, teardown

    env = setup(args.device or "auto")
    try:
        images = ImageFolder(args.data, args.resolution)
        n = encode_latents(images, args.vae, args.out, env.rank, env.world, args.shard_size, args.batch_size,
                           env.device, log=print if env.is_main else (lambda m: None))
    finally:
        teardown(env)
    print(f"rank {env.rank}: encoded {n} shard(s) into {args.out}")
    return 0


def cmd_convert_reference(args) -> int:
    from .reference import convert_reference_run

    out = convert_reference_run(args.checkpoint, args.config, args.out)
    print(f"converted into run folder {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soflow", description="Solution Flow Models: one-step generation.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train or resume a run")
    t.add_argument("--config", help="preset name (toy2d, ...) or YAML file, soflow's or the reference's format")
    t.add_argument("--run-dir", required=True, help="run folder; resumes when it holds checkpoints")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.total_steps=1000")
    t.add_argument("--stop-after", type=int, help="save and exit 0 after N steps of this invocation")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("--checkpoint", required=True, help="run folder, ckpt-*.pt file or exports/*.safetensors")
    s.add_argument("--num", type=int, default=64)
    s.add_argument("--nfe", type=int, default=1)
    s.add_argument("--mode", choices=("renoise", "chain"), default="renoise")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--class", dest="class_id", type=int, help="class id for a class-conditional model")
    s.add_argument("--guidance", type=float, default=1.0, help="sampling-time guidance scale (1: none)")
    s.add_argument("--weights", choices=("ema", "online"), default="ema")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--vae", help="latent models: SD-VAE folder to decode with (default: the run's data.vae)")
    s.add_argument("--out", required=True, help=".png (grid or scatter), .npz (uint8 NHWC arr_0), .npy, or a folder")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("encode-latents", help="encode an image folder with the SD-VAE (torchrun shards it)")
    e.add_argument("--data", required=True, help="image folder with one subfolder per class")
    e.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (sd-vae-ft-mse layout)")
    e.add_argument("--out", required=True)
    e.add_argument("--resolution", type=int, default=256)
    e.add_argument("--shard-size", type=int, default=1024)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--device", choices=("auto", "cpu", "cuda"))
    e.set_defaults(func=cmd_encode_latents)

    c = sub.add_parser("convert-reference", help="turn a reference checkpoint + YAML into a soflow run folder")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--config", required=True)
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_convert_reference)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _errors() + (ValueError,) as e:
        print(f"soflow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
