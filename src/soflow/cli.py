"""`soflow` command line: train, sample, convert-reference."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path



def _errors():
    from .data import DataError
    from .reference import CheckpointError as ReferenceError
    from .train.checkpoint import CheckpointError
    from .train.config import ConfigError
    from .train.loop import TrainingError

    return (ConfigError, DataError, CheckpointError, ReferenceError, TrainingError, FileNotFoundError, ImportError)


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
    """Samples over all torchrun ranks: rank r draws a contiguous range of whole batches (per-sample
    seeds make the result independent of the number of ranks) and streams them, batch by batch, into
    its part of the output; rank 0 then assembles the parts.  A rank holds one batch of float samples
    at a time, whatever --num."""
    import signal
    import threading
    import uuid

    import torch

    from .sampling import generate_chunks
    from .train import distributed
    from .train.load import load_run
    from .writers import SampleOutput

    def stop(signum, frame):  # torchrun ends the other ranks with SIGTERM: unwind so temporary files go
        raise SystemExit(128 + signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
    env = distributed.setup(args.device or "auto")
    output = None
    try:
        cfg, flow, step = load_run(args.checkpoint, args.weights, device=env.device,
                                   warn=lambda m: print(m, file=sys.stderr) if env.is_main else None)
        if env.device.type == "cuda":  # as in training and the reference's sampling (train.tf32, default on)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg.train.tf32)
        if args.class_id is not None and not flow.num_classes:
            raise ValueError("--class given but the model is unconditional")
        if args.mode and (args.mode in ("euler", "heun")) != (cfg.method == "flow_matching"):
            raise ValueError(f"--mode {args.mode}: method {cfg.method} samples with "
                             + ("euler | heun" if cfg.method == "flow_matching" else "renoise | chain"))
        token = distributed.all_gather_objects(env, uuid.uuid4().hex[:12])[0]  # rank 0's names the temporaries
        output = SampleOutput(args.out, flow.net.sample_shape, args.num, env.world, args.batch_size, token)
        output.check_destination()
        decode = lambda x: x  # noqa: E731
        if cfg.data.name == "imagenet-latents" and output.kind != "npy":  # .npy keeps the raw latents
            from .data.latents import decode as vae_decode, load_vae

            vae = load_vae(args.vae or cfg.data.vae, env.device)
            decode = lambda x: vae_decode(vae, x)  # noqa: E731
        failure = None
        try:
            first, last = output.range(env.rank)
            with output.writer(env.rank) as part:
                for x in generate_chunks(cfg.method, flow, first, last, args.nfe, mode=args.mode, seed=args.seed,
                                         labels=args.class_id, guidance=args.guidance, batch_size=args.batch_size):
                    part.write(decode(x))
        except Exception as e:  # every rank must reach the gather below, or the others would wait forever
            failure = e
        report = None if failure is None else f"{type(failure).__name__}: {failure}"
        reports = distributed.all_gather_objects(env, report)
        if failure is not None:
            raise failure
        failed = [(r, m) for r, m in enumerate(reports) if m]
        if failed:
            raise ValueError(f"rank {failed[0][0]} failed ({failed[0][1]}); nothing was written to {args.out}")
        if env.is_main:
            out = output.assemble()
            print(f"{args.num} samples ({args.nfe} steps, {cfg.method}, step {step}) written to {out}")
    finally:
        if output is not None and env.is_main:
            output.discard()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        distributed.teardown(env)
    return 0


def cmd_fid(args) -> int:
    import json

    from .eval.run import fid_against_reference, fid_reference

    opts = dict(weights=args.inception_weights, device=args.device, batch_size=args.batch_size,
                data_path=args.data_path, dims=args.dims, prc=args.prc, sfid=args.sfid)
    if args.fid_command == "ref":
        out, n = fid_reference(args.images, args.out, **opts)
        print(f"statistics of {n} images written to {out}")
        return 0
    result = fid_against_reference(args.images, args.ref, with_is=args.inception_score, **opts)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def cmd_eval(args) -> int:
    import json

    from .eval.run import eval_fmnist, eval_points

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
    s.add_argument("-n", "--num", type=int, default=64,
                   help="number of samples (under torchrun write -n: torchrun reads --num as its --numa-binding)")
    s.add_argument("--nfe", type=int, default=1)
    s.add_argument("--mode", choices=("renoise", "chain", "euler", "heun"),
                   help="soflow: renoise (default) | chain; meanflow: chain; flow_matching: euler (default) | heun")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--class", dest="class_id", type=int, help="class id for a class-conditional model")
    s.add_argument("--guidance", type=float, default=1.0, help="sampling-time guidance scale (1: none)")
    s.add_argument("--weights", choices=("ema", "online"), default="ema")
    s.add_argument("--batch-size", type=int, default=256,
                   help="samples per batch: each rank holds one batch at a time and ranks share whole batches")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--vae", help="latent models: SD-VAE folder to decode with (default: the run's data.vae)")
    s.add_argument("--out", required=True, help=".png (grid or scatter), .npz (uint8 NHWC arr_0), .npy, or a new "
                   "(or empty) folder; its parent must be visible to every rank (ranks write parts there)")
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

    f = sub.add_parser("fid", help="FID, sFID, Inception Score, precision/recall with torch-fidelity's InceptionV3 "
                                   "(local weights)")
    fsub = f.add_subparsers(dest="fid_command", required=True)
    for name in ("ref", "calc"):
        q = fsub.add_parser(name, help="write reference statistics" if name == "ref" else "FID against a reference")
        q.add_argument("--images", required=True, help="image folder, ADM-style .npz (arr_0 uint8 NHWC), fmnist or cifar10")
        q.add_argument("--data-path", help="dataset folder when --images names a dataset")
        q.add_argument("--inception-weights", help="pt_inception-2015-12-05 weights (default: $SOFLOW_INCEPTION_WEIGHTS "
                                                   "or ~/.cache/soflow/pt_inception-2015-12-05-6726825d.pth)")
        q.add_argument("--batch-size", type=int, default=64)
        q.add_argument("--device")
        q.add_argument("--dims", choices=("2048", "768", "192", "64"), default="2048",
                       help="Inception layer of FID and precision/recall (2048: the standard pool features)")
        if name == "ref":
            q.add_argument("--out", required=True, help="statistics .npz (mu, sigma)")
            q.add_argument("--prc", action="store_true",
                           help="also store the features themselves (key features, float32 [N, D]) for precision/recall")
            q.add_argument("--sfid", action="store_true",
                           help="also store ADM's spatial statistics mu_s, sigma_s (mixed_6/conv, 2023 features) for sFID")
        else:
            q.add_argument("--ref", required=True, help="statistics .npz with mu and sigma (ADM's reference files work)")
            q.add_argument("--json", help="also write the result as JSON here")
            q.add_argument("--is", dest="inception_score", action="store_true", help="also compute the Inception Score")
            q.add_argument("--prc", action="store_true",
                           help="also compute precision and recall (k = 3 nearest neighbours) against the reference's "
                                "features (`fid ref --prc`) or the images in its arr_0 (ADM's reference batches)")
            q.add_argument("--sfid", action="store_true",
                           help="also compute sFID against the reference's mu_s, sigma_s (`fid ref --sfid`, ADM's files)")
    f.set_defaults(func=cmd_fid)

    v = sub.add_parser("eval", help="evaluate a trained run")
    vsub = v.add_subparsers(dest="eval_command", required=True)
    for name in ("points", "fmnist"):
        q = vsub.add_parser(name, help="energy distance and sliced W2" if name == "points"
                            else "classifier Frechet distance and class accuracy")
        q.add_argument("--checkpoint", required=True)
        q.add_argument("--nfe", type=int, default=1)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--json", help="also write the result as JSON here")
        if name == "points":
            q.add_argument("--num", type=int, default=2000)
        else:
            q.add_argument("--per-class", type=int, default=100)
            q.add_argument("--data-path", help="Fashion-MNIST folder (default: the run's data.path or the Debian one)")
            q.add_argument("--guidance", type=float, default=1.0, help="sampling-time guidance scale (1: none)")
    v.set_defaults(func=cmd_eval)

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
        if os.environ.get("SOFLOW_DEBUG"):
            raise
        print(f"soflow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
