"""The argument parser of `soflow`: one sub-parser per command, with its description and examples."""

from __future__ import annotations

import argparse
import textwrap

from .. import __version__
from ..run.presets import preset_names
from ..sampling import MODES
from .env import cmd_env
from .commands import cmd_convert_reference, cmd_encode_latents, cmd_eval, cmd_export, cmd_fid, cmd_train
from .sample import cmd_sample


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and appends each option's default, where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and "%(default)" not in text and default is not None and default is not False
                and default is not argparse.SUPPRESS and default != []):
            text += " (default: %(default)s)"
        return text


def command(parent: argparse._SubParsersAction, name: str, help: str, description: str,
            examples: list[str]) -> argparse.ArgumentParser:
    """A sub-command parser of `parent` with its help, description and examples."""
    return parent.add_parser(name, help=help, description=description, formatter_class=Formatter,
                             epilog="examples:\n" + "\n".join(f"  {line}" for line in examples))


def _checkpoint_argument(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="RUN",
                   help="run folder (newest readable checkpoint), ckpt-*.pt file, exports/*.safetensors, or a "
                        "pipeline folder (`soflow export`)")


def build_parser() -> argparse.ArgumentParser:
    """The `soflow` argument parser with every sub-command."""
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

    _train_parser(sub)
    _sample_parser(sub)
    _export_parser(sub)
    _encode_latents_parser(sub)
    _fid_parser(sub)
    _eval_parser(sub)
    _convert_reference_parser(sub)
    _env_parser(sub)
    return p


def _env_parser(sub) -> None:
    e = command(sub, "env", "print versions, devices and settings for a bug report", (
        "Print what a bug report needs: soflow, Python, torch, CUDA, cuDNN and NCCL versions, the CPU cores\n"
        "and memory, each GPU with its memory, the thread settings, the distributed back-ends, the optional\n"
        "packages present and the environment variables that change a run.  Nothing is computed on a device."),
        ["soflow env", "soflow env --json > env.json"])
    e.add_argument("--json", action="store_true", help="print one JSON object instead of text lines")
    e.set_defaults(func=cmd_env)


def _train_parser(sub) -> None:
    presets = preset_names()
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


def _sample_parser(sub) -> None:
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
         "soflow sample --checkpoint runs/fmnist-any-guidance --guidance 3 --nfe 1 --num 100 --out w3.png",
         "torchrun --nproc-per-node=8 -m soflow sample --checkpoint runs/dit -n 50000 --out samples.npz"])
    _checkpoint_argument(s)
    s.add_argument("-n", "--num", type=int, default=64,
                   help="number of samples (under torchrun write -n: torchrun reads --num as its --numa-binding)")
    s.add_argument("--nfe", type=int, default=1,
                   help="steps per sample: one network evaluation each, except --mode heun, which spends "
                        "2 NFE - 1 (the figure title and summary line give the evaluations)")
    s.add_argument("--mode", choices=MODES,
                   help="sampler (default: the method's own): chain (follow one trajectory; soflow, meanflow, "
                        "shortcut) | renoise (jump to 0, re-noise at each grid time; the reference's rule for soflow) "
                        "| euler, heun (ODE steps on the velocity; flow_matching)")
    s.add_argument("--seed", type=int, default=0, help="seed of the noise (and of random classes)")
    s.add_argument("--class", dest="class_id", type=int, metavar="C",
                   help="class id for a class-conditional model (default: a random class per sample)")
    s.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale of the velocity field sampled (default: the model's own): "
                        "the input of a model trained with guidance_range, the training scale of a fixed-scale "
                        "soflow/meanflow model (others refused), two forwards per step for flow matching")
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


def _export_parser(sub) -> None:
    x = command(sub, "export", "write a run as a pipeline folder (Hugging Face layout)", (
        "Write a run's EMA weights as a pipeline folder: config.json, model.safetensors, a README.md model card\n"
        "with the training config, and samples.png.  `soflow.Pipeline.from_pretrained(FOLDER)` opens it with\n"
        "safetensors only, and `huggingface_hub.upload_folder` can publish it unchanged."),
        ["soflow export --checkpoint runs/fm --out fmnist-soflow",
         "python -c 'import soflow; soflow.Pipeline.from_pretrained(\"fmnist-soflow\")(num=4, nfe=1)'"])
    _checkpoint_argument(x)
    x.add_argument("--out", required=True, help="new (or empty) folder")
    x.add_argument("--weights", choices=("ema", "online"), default="ema", help="EMA or online weights")
    x.add_argument("--vae", help="latent models: SD-VAE folder for the sample grid (default: the run's data.vae)")
    x.add_argument("--no-grid", action="store_true", help="leave out samples.png (and its 64 samples)")
    x.set_defaults(func=cmd_export)


def _encode_latents_parser(sub) -> None:
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


def _fid_parser(sub) -> None:
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


def _eval_parser(sub) -> None:
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
        _checkpoint_argument(q)
        q.add_argument("--nfe", type=int, default=1,
                       help="steps per sample: network evaluations (flow matching: Euler steps)")
        q.add_argument("--seed", type=int, default=0, help="seed of the noise")
        q.add_argument("--json", help="also write the result as JSON here")
        if name == "points":
            q.add_argument("--num", type=int, default=2000, help="generated points (and data points)")
        else:
            q.add_argument("--per-class", type=int, default=100, help="samples of each class")
            q.add_argument("--data-path", help="Fashion-MNIST folder (default: the run's data.path or the Debian one)")
            q.add_argument("--guidance", type=float, default=None,
                           help="classifier-free guidance scale of the velocity field sampled (default: the model's own): "
                                "the input of a model trained with guidance_range, the training scale of a fixed-scale "
                                "soflow/meanflow model (others refused), two forwards per step for flow matching")
    v.set_defaults(func=cmd_eval)


def _convert_reference_parser(sub) -> None:
    c = command(sub, "convert-reference", "turn a reference checkpoint + YAML into a soflow run folder", (
        "Turn a checkpoint of the authors' implementation and its YAML into a soflow run folder: model, EMA\n"
        "and optimizer state carry over, so `soflow sample` reads it and `soflow train` continues it."),
        ["soflow convert-reference --checkpoint ckpt.pt --config imagenet.yaml --out runs/converted",
         "soflow sample --checkpoint runs/converted --num 64 --nfe 1 --out grid.png"])
    c.add_argument("--checkpoint", required=True, help="the reference's checkpoint (.pt)")
    c.add_argument("--config", required=True, help="the reference's YAML that trained it")
    c.add_argument("--out", required=True, help="new run folder")
    c.set_defaults(func=cmd_convert_reference)
