"""The sections of a run config: their dataclasses, defaults and the type of each key.

The sections of the training methods are their loss dataclasses themselves, one per entry of
soflow.methods.METHODS (one set of names, defaults and range checks).  Merging YAML and overrides
into a Config, and loading: `config`; value checks: `validate`.  This module imports neither.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

from ..methods import METHODS


@dataclass
class ModelConfig:
    """The `model` section: network, its arguments, noising path and parameterization."""

    net: str = "mlp"  # a name from soflow.nets.REGISTRY
    net_args: dict = field(default_factory=dict)  # constructor overrides, e.g. {hidden: 128}
    path: str = "linear"  # noising path: linear | trig
    parameterization: str = "euler"  # euler | trig


@dataclass
class DataConfig:
    """The `data` section: dataset, its files and how it is read."""

    # one of soflow.data.DATASETS: a 2-D toy, points, fmnist, cifar10, imagefolder, imagenet-latents
    name: str = "checkerboard"
    path: typing.Optional[str] = None  # data file or folder (points: an [N, D] float .npy)
    conditional: bool = True  # use the class labels (fmnist, cifar10)
    resolution: int = 64  # imagefolder: ADM centre crop size
    augment_p: float = 0.0  # EDM augmentation probability (cifar10-unet: 0.12); labels go to the network
    vae: typing.Optional[str] = None  # imagenet-latents: local SD-VAE folder, to decode samples
    num_workers: int = 0
    prefetch_factor: int = 2


@dataclass
class TrainConfig:
    """The `train` section: schedule, optimizer, precision, EMA, checkpoints, samples and FID."""

    total_steps: int = 20_000  # also K of the middle-time schedule r(k, K)
    batch_size: int = 256  # global, over all ranks and accumulation steps
    grad_accum: int = 1
    seed: int = 0
    # Starting weights of a new run (ignored once it has checkpoints): a run folder, checkpoint,
    # export, pipeline folder or SiT checkpoint of the same network; its EMA weights (soflow.run.init).
    init: typing.Optional[str] = None
    init_sha256: typing.Optional[str] = None  # recorded by the trainer; a given value must match the weights
    optimizer: str = "adamw"  # adamw | radam
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    grad_clip: typing.Optional[float] = None  # clip the gradient norm to this before each step (null: no clipping)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; loss math stays fp32)
    tf32: bool = True
    compile: bool = False
    fsdp: bool = False  # shard with torch.distributed fully_shard instead of DDP
    device: str = "auto"  # auto | cpu | cuda
    ema_decay: float = 0.9999
    ema_every: int = 1
    ema_float64: bool = False
    checkpoint_every: int = 1000
    keep_last: int = 2  # newest checkpoints kept
    keep_every: int = 0  # also keep the checkpoint of every multiple of this step (0: none)
    log_every: int = 100
    sample_every: int = 0  # EMA sample plot/grid every N steps (0: only at the end)
    sample_num: int = 1000
    sample_nfe: list = field(default_factory=lambda: [1, 2])
    sample_mode: typing.Optional[str] = None  # sampler of the figures and of FID while training (null: the method's)
    tensorboard: bool = False
    threads: int = 0  # intra-op CPU threads; 0: one for small networks, every core for large ones
    # FID of EMA samples during training (soflow.train.training_fid); the first NFE picks best-fid.pt.
    fid_every: int = 0  # every N steps and at the last step (0: off)
    fid_num: int = 50_000  # samples per score, spread over the ranks
    fid_nfe: list = field(default_factory=lambda: [1, 2])  # one score per entry: fid_nfe1, fid_nfe2, ...
    # classifier-free guidance scales scored at each NFE (soflow.guidance; empty: the model's own):
    # fid_nfe1_w1.5, fid_nfe1_w3, ...; the first NFE and first scale pick best-fid.pt
    fid_guidance: list = field(default_factory=list)
    fid_ref: typing.Optional[str] = None  # reference statistics .npz with mu, sigma (`soflow fid ref` or ADM's)
    fid_inception: typing.Optional[str] = None  # Inception weights (null: $SOFLOW_INCEPTION_WEIGHTS or ~/.cache/soflow)
    fid_batch_size: int = 250  # samples generated, decoded and scored at once on each rank
    fid_dims: int = 2048  # Inception layer: 2048 (pool, the standard FID) | 768 | 192 | 64 (cheap proxies)


def _derived(cls) -> dict:
    """{field: dotted key} of the fields whose value follows another key (SoFlowLoss.total_steps is
    train.total_steps): not settable, not written to config.yaml, filled in by `load`."""
    if not dataclasses.is_dataclass(cls):
        return {}
    return {f.name: f.metadata["from"] for f in dataclasses.fields(cls) if "from" in f.metadata}


def _plain(obj):
    """A config object as YAML-ready data: nested dicts and lists, derived fields left out."""
    if dataclasses.is_dataclass(obj):
        skip = _derived(type(obj))
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in skip}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _to_dict(self) -> dict:
    return _plain(self)


# method, model, one section per training method (its loss), data, train
Config = dataclasses.make_dataclass("Config", [
    ("method", str, field(default="soflow")),
    ("model", ModelConfig, field(default_factory=ModelConfig)),
    *[(m.section, m.loss, field(default_factory=m.loss)) for m in METHODS.values()],
    ("data", DataConfig, field(default_factory=DataConfig)),
    ("train", TrainConfig, field(default_factory=TrainConfig)),
], namespace={"to_dict": _to_dict, "__module__": __name__})


# ---------------------------------------------------------------- type checks

def type_ok(value: object, tp: typing.Any) -> bool:
    """Whether `value` (read from YAML or `--set`) is of the annotated type `tp`: ints pass as floats,
    bools as neither, lists as tuples."""
    if tp is tuple:  # YAML has lists only
        return isinstance(value, (list, tuple))
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def describe(tp: typing.Any) -> str:
    """`tp` in words, for the one-line error of a value of the wrong type."""
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
             tuple: "a list", dict: "a mapping"}
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else names.get(a, str(a)) for a in typing.get_args(tp))
    return names.get(tp, str(tp))
