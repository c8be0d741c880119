"""`soflow` command line.

Commands (`soflow COMMAND --help` has the options and examples of each):

- `train`: train a model from a preset or YAML into a run folder, or resume it;
- `sample`: draw samples from a run into a .png, .npz, .npy or a folder of PNGs;
- `encode-latents`: encode an image folder into SD-VAE latent shards;
- `fid ref` / `fid calc`: Inception statistics of reference images / FID (sFID, IS, precision/recall);
- `eval points` / `eval fmnist`: score a 2-D run / a Fashion-MNIST run;
- `convert-reference`: turn an authors' checkpoint and YAML into a soflow run folder.

`soflow --version` prints the version.  Bad input ends a command with one line on stderr and exit
status 2 (SOFLOW_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import ConfigError, SoflowError


# OS errors about a path the user gave (a missing file, a read-only or occupied destination): bad
# input like a SoflowError, printed as "PATH: reason".
PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError)


def cmd_train(args) -> int:
    from .run.config import check_run_dir, dump, load, read_yaml
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
    check_run_dir(run_dir)  # a read-only checkpoints/ would otherwise fail at the first save, after training
    result = train(cfg, run_dir, stop_after=args.stop_after)  # the run log already named the sample figures
    if result.get("export"):
        print(f"EMA weights exported to {Path(result['export']).resolve()}")
    return 0


def cmd_sample(args) -> int:
    """Samples over all torchrun ranks: rank r draws a contiguous range of whole batches (per-sample
    seeds make the result independent of the number of ranks) and streams them, batch by batch, into
    its part of the output; rank 0 then assembles the parts.  A rank holds one batch of float samples
    at a time, whatever --num."""
    import math
    import signal
    import threading
    import uuid

    import torch

    from .sampling import generate_chunks
    from . import distributed
    from .run.config import unwritable
    from .run.load import load_run
    from .writers import SampleOutput

    # The arguments are checked before a model is loaded, so that a wrong value costs no wait.
    if str(args.device or "auto").lower() not in distributed.DEVICES:
        raise ConfigError(f"--device {args.device}: choose one of {', '.join(distributed.DEVICES)}")
    for flag, value in (("--num", args.num), ("--nfe", args.nfe), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if not math.isfinite(args.guidance):
        raise ConfigError(f"--guidance must be a finite number, got {args.guidance}")
    problem = unwritable(Path(args.out).parent)
    if problem:
        raise ConfigError(f"--out {args.out}: cannot write there: {problem}")

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
            raise ConfigError(f"--class {args.class_id}: the model is unconditional; leave --class out")
        from .sampling import guidance_problem
        from .run.build import guided_training

        problem = guidance_problem(flow, args.guidance, trained_with_dropout=guided_training(cfg))
        if problem:
            raise ConfigError(f"--guidance {args.guidance}: {problem}")
        if args.mode and (args.mode in ("euler", "heun")) != (cfg.method == "flow_matching"):
            raise ConfigError(f"--mode {args.mode}: method {cfg.method} samples with "
                              + ("euler | heun" if cfg.method == "flow_matching" else "renoise | chain"))
        token = distributed.all_gather_objects(env, uuid.uuid4().hex[:12])[0]  # rank 0's names the temporaries
        from .plots import plural, sample_title

        title = sample_title(cfg.method, args.nfe, args.mode, step, args.guidance, args.weights, args.class_id)
        output = SampleOutput(args.out, flow.net.sample_shape, args.num, env.world, args.batch_size, token, title)
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
            # the failing rank prints its own error; this one only says that nothing was written
            raise SoflowError(f"rank {failed[0][0]} failed ({failed[0][1]}); nothing was written to {args.out}")
        if env.is_main:
            out = output.assemble()
            print(f"{plural(args.num, 'sample')} ({cfg.method}, {title}) written to {Path(out).resolve()}")
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
        print(f"statistics of {n} image{'' if n == 1 else 's'} written to {out}")
        return 0
    result = fid_against_reference(args.images, args.ref, with_is=args.inception_score, **opts)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def cmd_eval(args) -> int:
    import json
    import math

    from .eval.run import eval_fmnist, eval_points
    from .run.config import unwritable

    # The arguments are checked before a model is loaded or a sample drawn.
    count = ("--num", args.num) if args.eval_command == "points" else ("--per-class", args.per_class)
    for flag, value in (("--nfe", args.nfe), count):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.eval_command == "fmnist" and not math.isfinite(args.guidance):
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


def cmd_encode_latents(args) -> int:
    from .data.images import ImageFolder
    from .data.latents import encode_latents
    from .distributed import setup, teardown

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
    import textwrap

    from . import __version__
    from .run.config import preset_names

    class Formatter(argparse.RawDescriptionHelpFormatter):
        """Keeps the examples' line breaks and appends each option's default, where it has one."""

        def _get_help_string(self, action):
            text = action.help or ""
            default = action.default
            if (action.option_strings and "%(default)" not in text and default is not None and default is not False
                    and default is not argparse.SUPPRESS and default != []):
                text += " (default: %(default)s)"
            return text

    def command(parent, name, help, description, examples):
        return parent.add_parser(name, help=help, description=description, formatter_class=Formatter,
                                 epilog="examples:\n" + "\n".join(f"  {line}" for line in examples))

    presets = preset_names()
    p = argparse.ArgumentParser(
        prog="soflow", formatter_class=Formatter,
        description="Solution Flow Models (SoFlow): train one-step generative models, draw samples with one or a\n"
                    "few network function evaluations (NFE), and score them.",
        epilog="examples:\n"
               "  soflow train --config toy2d --run-dir runs/toy2d\n"
               "  soflow sample --checkpoint runs/toy2d --num 2000 --nfe 1 --out toy.png\n"
               "  soflow eval points --checkpoint runs/toy2d --nfe 2\n"
               "\n`soflow COMMAND --help` describes each command.  Set SOFLOW_DEBUG=1 to see the traceback behind an "
               "error line.")
    p.add_argument("--version", action="version", version=f"soflow {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = command(sub, "train", "train a model, or resume a run", (
        "Train a model from a preset or a YAML file into a run folder: config.yaml, log.txt, metrics.jsonl,\n"
        "checkpoints/, samples/ (EMA figures) and exports/ (safetensors of the EMA weights).  A run folder that\n"
        "holds checkpoints resumes from the newest readable one; a stopped run restarted with the same command\n"
        "ends with the weights of an uninterrupted run.  SIGTERM or Ctrl-C saves a checkpoint and exits.\n"
        "Multi-process: torchrun --nproc-per-node=N -m soflow train ... (train.batch_size is global).\n"
        "\n" + textwrap.fill(f"presets: {', '.join(presets)}", 100, subsequent_indent="  ")),
        ["soflow train --config toy2d --run-dir runs/toy2d",
         "soflow train --config fmnist --run-dir runs/fm --set train.total_steps=2000 --set train.batch_size=64",
         "soflow train --config cifar.yaml --run-dir runs/cifar    # the reference's YAML works too",
         "soflow train --config toy2d --run-dir runs/toy2d --stop-after 500   # later: the same command resumes",
         "soflow train --config toy2d --run-dir runs/toy2d --set method=meanflow --dry-run"])
    t.add_argument("--config", metavar="PRESET_OR_YAML",
                   help=f"a preset ({', '.join(presets)}) or a YAML file in soflow's or the reference's format; "
                        "optional when --run-dir already holds a config.yaml")
    t.add_argument("--run-dir", required=True, metavar="DIR",
                   help="run folder (created if missing); resumes when it holds checkpoints")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (dotted, YAML value); repeatable, e.g. --set train.total_steps=1000 "
                        "--set model.net_args.hidden=64")
    t.add_argument("--stop-after", type=int, metavar="N",
                   help="save a checkpoint and exit 0 after N steps of this call (rerun to continue)")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config as YAML and exit")
    t.set_defaults(func=cmd_train)

    s = command(sub, "sample", "draw samples from a trained run", (
        "Draw samples from a run folder, a checkpoint or an exported .safetensors, with the EMA weights by\n"
        "default.  Sample i depends only on (--seed, i): the same command gives the same samples whatever the\n"
        "batch size or number of processes.  The output type follows --out: .png (image grid, or scatter plot\n"
        "of 2-D points, titled with the NFE and mode), .npz (ADM layout: uint8 NHWC arr_0 for images, float for\n"
        "points), .npy (raw float array) or a new folder (one PNG per sample; image runs only).\n"
        "Under torchrun the samples are spread over the ranks; write -n there, not --num."),
        ["soflow sample --checkpoint runs/toy2d --num 2000 --nfe 1 --out toy.png",
         "soflow sample --checkpoint runs/toy2d --num 2000 --nfe 2 --mode chain --out toy2.npy",
         "soflow sample --checkpoint runs/fm --num 100 --nfe 1 --class 7 --guidance 2 --out sneakers.png",
         "torchrun --nproc-per-node=8 -m soflow sample --checkpoint runs/dit -n 50000 --out samples.npz"])
    s.add_argument("--checkpoint", required=True, metavar="RUN",
                   help="run folder (newest readable checkpoint), ckpt-*.pt file or exports/*.safetensors")
    s.add_argument("-n", "--num", type=int, default=64,
                   help="number of samples (under torchrun write -n: torchrun reads --num as its --numa-binding)")
    s.add_argument("--nfe", type=int, default=1,
                   help="network evaluations per sample (flow matching: ODE steps)")
    s.add_argument("--mode", choices=("renoise", "chain", "euler", "heun"),
                   help="sampler: soflow renoise (default; jump to 0, re-noise at each grid time) | chain (follow one "
                        "trajectory); meanflow: chain; flow_matching: euler (default) | heun")
    s.add_argument("--seed", type=int, default=0, help="seed of the noise (and of random classes)")
    s.add_argument("--class", dest="class_id", type=int, metavar="C",
                   help="class id for a class-conditional model (default: a random class per sample)")
    s.add_argument("--guidance", type=float, default=1.0, help="sampling-time guidance scale (1: none)")
    s.add_argument("--weights", choices=("ema", "online"), default="ema",
                   help="EMA weights or the online (trained) weights")
    s.add_argument("--batch-size", type=int, default=256,
                   help="samples per batch: each rank holds one batch at a time and ranks share whole batches")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--vae", help="latent models: SD-VAE folder to decode with (default: the run's data.vae)")
    s.add_argument("--out", required=True, metavar="OUT",
                   help=".png (grid or scatter), .npz (uint8 NHWC arr_0), .npy, or a new (or empty) folder; its "
                        "parent must be visible to every rank (ranks write parts there)")
    s.set_defaults(func=cmd_sample)

    e = command(sub, "encode-latents", "encode an image folder with the SD-VAE (torchrun shards it)", (
        "Encode an image folder (one subfolder per class, ADM centre crop) into SD-VAE latent shards for the\n"
        "imagenet-dit-* presets: the posterior mean and std of each image, so that training draws a fresh\n"
        "latent every step.  Spread over torchrun ranks; rerunning skips finished shards."),
        ["soflow encode-latents --data /data/imagenet/train --vae /models/sd-vae-ft-mse --out /data/latents",
         "torchrun --nproc-per-node=8 -m soflow encode-latents --data IMAGES --vae VAE --out LATENTS"])
    e.add_argument("--data", required=True, help="image folder with one subfolder per class")
    e.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (sd-vae-ft-mse layout)")
    e.add_argument("--out", required=True, help="output folder of shard-NNNNN/ subfolders")
    e.add_argument("--resolution", type=int, default=256, help="image size after the centre crop")
    e.add_argument("--shard-size", type=int, default=1024, help="images per shard (the unit of resuming)")
    e.add_argument("--batch-size", type=int, default=32, help="images encoded at once on each rank")
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: cuda when available")
    e.set_defaults(func=cmd_encode_latents)

    f = command(sub, "fid", "FID, sFID, Inception Score, precision/recall (local Inception weights)", (
        "Inception features from torch-fidelity's InceptionV3 with a local weights file (nothing is\n"
        "downloaded); statistics in float64.  `fid ref` writes the statistics of a reference image set,\n"
        "`fid calc` scores images against them (ADM's reference .npz files work as references)."),
        ["soflow fid ref --images fmnist --out fmnist-ref.npz",
         "soflow fid calc --images samples.npz --ref fmnist-ref.npz --json fid.json --is",
         "soflow fid calc --images samples.npz --ref VIRTUAL_imagenet256_labeled.npz --prc --sfid"])
    fsub = f.add_subparsers(dest="fid_command", required=True, metavar="{ref,calc}")
    for name in ("ref", "calc"):
        if name == "ref":
            q = command(fsub, "ref", "write reference statistics", (
                "Write the Inception statistics (mu, sigma) of an image source to an .npz file."),
                ["soflow fid ref --images cifar10 --data-path /data/cifar-10-batches-py --out cifar-ref.npz",
                 "soflow fid ref --images real/ --out ref.npz --prc --sfid"])
        else:
            q = command(fsub, "calc", "FID of images against a reference", (
                "FID of an image source against reference statistics, printed as one JSON line; with the\n"
                "flags also the Inception Score, sFID and precision/recall."),
                ["soflow fid calc --images samples.npz --ref ref.npz",
                 "soflow fid calc --images samples/ --ref ref.npz --is --json fid.json"])
        q.add_argument("--images", required=True, metavar="SRC",
                       help="image folder, ADM-style .npz (arr_0 uint8 NHWC), fmnist or cifar10")
        q.add_argument("--data-path", help="dataset folder when --images names a dataset")
        q.add_argument("--inception-weights", help="pt_inception-2015-12-05 weights (default: $SOFLOW_INCEPTION_WEIGHTS "
                                                   "or ~/.cache/soflow/pt_inception-2015-12-05-6726825d.pth)")
        q.add_argument("--batch-size", type=int, default=64, help="images per Inception forward")
        q.add_argument("--device", help="cpu or cuda (default: cuda when available)")
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

    v = command(sub, "eval", "score a trained run (2-D points or Fashion-MNIST)", (
        "Score a trained run against its data; the result is printed as one JSON line."),
        ["soflow eval points --checkpoint runs/toy2d --nfe 1",
         "soflow eval fmnist --checkpoint runs/fm --nfe 2 --guidance 2 --json scores.json"])
    vsub = v.add_subparsers(dest="eval_command", required=True, metavar="{points,fmnist}")
    for name in ("points", "fmnist"):
        if name == "points":
            q = command(vsub, "points", "energy distance and sliced W2 of a 2-D (vector) run", (
                "Energy distance and sliced Wasserstein-2 distance between --num generated points and --num\n"
                "points of the run's data (lower is better; 0 for equal distributions)."),
                ["soflow eval points --checkpoint runs/toy2d --nfe 1",
                 "soflow eval points --checkpoint runs/toy2d --nfe 2 --num 5000 --json toy.json"])
        else:
            q = command(vsub, "fmnist", "classifier Frechet distance and class accuracy of a Fashion-MNIST run", (
                "Draw --per-class samples of each of the 10 classes and score them with the shipped Fashion-MNIST\n"
                "classifier: Frechet distance of its features to the test split, and accuracy on the requested class."),
                ["soflow eval fmnist --checkpoint runs/fm --nfe 1",
                 "soflow eval fmnist --checkpoint runs/fm --nfe 1 --guidance 2 --json scores.json"])
        q.add_argument("--checkpoint", required=True, metavar="RUN",
                       help="run folder, ckpt-*.pt file or exports/*.safetensors")
        q.add_argument("--nfe", type=int, default=1, help="network evaluations per sample (flow matching: ODE steps)")
        q.add_argument("--seed", type=int, default=0, help="seed of the noise")
        q.add_argument("--json", help="also write the result as JSON here")
        if name == "points":
            q.add_argument("--num", type=int, default=2000, help="generated points (and data points)")
        else:
            q.add_argument("--per-class", type=int, default=100, help="samples of each class")
            q.add_argument("--data-path", help="Fashion-MNIST folder (default: the run's data.path or the Debian one)")
            q.add_argument("--guidance", type=float, default=1.0, help="sampling-time guidance scale (1: none)")
    v.set_defaults(func=cmd_eval)

    c = command(sub, "convert-reference", "turn a reference checkpoint + YAML into a soflow run folder", (
        "Turn a checkpoint of the authors' implementation and its YAML into a soflow run folder: model, EMA\n"
        "and optimizer state carry over, so `soflow sample` reads it and `soflow train` continues it."),
        ["soflow convert-reference --checkpoint ckpt.pt --config imagenet.yaml --out runs/converted",
         "soflow sample --checkpoint runs/converted --num 64 --nfe 1 --out grid.png"])
    c.add_argument("--checkpoint", required=True, help="the reference's checkpoint (.pt)")
    c.add_argument("--config", required=True, help="the reference's YAML that trained it")
    c.add_argument("--out", required=True, help="new run folder")
    c.set_defaults(func=cmd_convert_reference)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SoflowError, *PATH_ERRORS) as e:  # bad input; anything else is a fault and keeps its traceback
        if os.environ.get("SOFLOW_DEBUG"):
            raise
        # an OS error reads "PATH: reason" (a path the user gave); every message is kept on one line
        text = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        text = " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__
        print(f"soflow {args.command}: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
