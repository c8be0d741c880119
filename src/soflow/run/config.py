"""Typed run configuration: dataclass defaults <- YAML preset or file <- dotted `--set` overrides.

Every error names the offending key and says what it accepts (ConfigError, one line).
The reference implementation's flat YAML files are recognised and translated (`from_reference`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..objectives.flow_matching import FlowMatchingLoss
from ..objectives.meanflow import MeanFlowLoss

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class ModelConfig:
    net: str = "mlp"  # a name from soflow.nets.REGISTRY
    net_args: dict = field(default_factory=dict)  # constructor overrides, e.g. {hidden: 128}
    path: str = "linear"  # noising path: linear | trig
    parameterization: str = "euler"  # euler | trig


@dataclass
class ObjectiveConfig:
    """SoFlow loss settings (names follow soflow.objectives.SoFlowLoss)."""

    p: float = 1.0
    eps: float = 0.01
    velocity_loss_ratio: float = 0.75
    time_mean: list = field(default_factory=lambda: [-0.2, -1.0, 0.2])
    time_std: list = field(default_factory=lambda: [1.0, 0.8, 0.8])
    cfg_scale: float = 1.0
    mix_ratio: float = 1.0
    cfg_drop_rate: float = 0.0
    cfg_decay_time: float = 1.0
    schedule: str = "exponent"
    r_init: float = 0.1
    r_end: float = 0.002


@dataclass
class DataConfig:
    # checkerboard | moons | 8gaussians | spirals | points | fmnist | cifar10 | imagefolder | imagenet-latents
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
    total_steps: int = 20_000  # also K of the middle-time schedule r(k, K)
    batch_size: int = 256  # global, over all ranks and accumulation steps
    grad_accum: int = 1
    seed: int = 0
    optimizer: str = "adamw"  # adamw | radam
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
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
    tensorboard: bool = False
    threads: int = 0  # intra-op CPU threads; 0: one for small networks, every core for large ones
    # FID of EMA samples during training (soflow.eval.training_fid); the first NFE picks best-fid.pt.
    fid_every: int = 0  # every N steps and at the last step (0: off)
    fid_num: int = 50_000  # samples per score, spread over the ranks
    fid_nfe: list = field(default_factory=lambda: [1, 2])  # one score per entry: fid_nfe1, fid_nfe2, ...
    fid_ref: typing.Optional[str] = None  # reference statistics .npz with mu, sigma (`soflow fid ref` or ADM's)
    fid_inception: typing.Optional[str] = None  # Inception weights (null: $SOFLOW_INCEPTION_WEIGHTS or ~/.cache/soflow)
    fid_batch_size: int = 250  # samples generated, decoded and scored at once on each rank
    fid_dims: int = 2048  # Inception layer: 2048 (pool, the standard FID) | 768 | 192 | 64 (cheap proxies)


@dataclass
class Config:
    method: str = "soflow"
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    # The baselines' sections are their loss dataclasses themselves (one set of names and defaults).
    meanflow: MeanFlowLoss = field(default_factory=MeanFlowLoss)
    flow_matching: FlowMatchingLoss = field(default_factory=FlowMatchingLoss)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


METHODS = ("soflow", "meanflow", "flow_matching")
CHOICES = {
    "method": METHODS,
    "model.path": ("linear", "trig"),
    "model.parameterization": ("euler", "trig"),
    "objective.schedule": ("const", "linear", "cosine", "exponent"),
    "train.optimizer": ("adamw", "radam"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
}


# ---------------------------------------------------------------- merging and type checks

def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
             dict: "a mapping"}
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else names.get(a, str(a)) for a in typing.get_args(tp))
    return names.get(tp, str(tp))


def _set(obj, dotted: str, value, prefix: str = "") -> None:
    head, _, rest = dotted.partition(".")
    key = prefix + head
    hints = typing.get_type_hints(type(obj))
    if head not in hints:
        raise ConfigError(f"unknown config key {key!r}; known keys here: {', '.join(prefix + k for k in hints)}")
    tp = hints[head]
    if dataclasses.is_dataclass(tp):
        if rest:
            return _set(getattr(obj, head), rest, value, key + ".")
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of its keys, got {value!r}")
        for k, v in value.items():
            _set(getattr(obj, head), str(k), v, key + ".")
        return
    if rest and tp is dict:
        getattr(obj, head)[rest] = value  # free-form mapping, e.g. model.net_args.hidden
        return
    if rest:
        raise ConfigError(f"unknown config key {key + '.' + rest!r}: {key} has no sub-keys")
    if not _type_ok(value, tp):
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if tp is float or (typing.get_origin(tp) is not None and float in typing.get_args(tp) and isinstance(value, int)):
        value = float(value)
    setattr(obj, head, value)


def apply(cfg: Config, values: dict) -> Config:
    for k, v in values.items():
        _set(cfg, str(k), v)
    return cfg


def parse_override(text: str) -> tuple[str, object]:
    """'train.total_steps=1000' -> ('train.total_steps', 1000); values are parsed as YAML scalars."""
    key, eq, raw = text.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.total_steps=1000")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def has_labels(data: DataConfig) -> bool:
    """Whether training batches carry class labels (the toys and `points` never do)."""
    return data.name in ("imagefolder", "imagenet-latents") or (data.name in ("fmnist", "cifar10") and data.conditional)


def _validate_guidance(cfg: Config) -> None:
    """Refuse the training-time guidance settings whose meaning differs from the reference trainer's.

    The reference guides only when the batch has labels and cfg_scale > 1; only then does it drop
    labels (cfg_drop_rate) and mix in the model's own velocity (mix_ratio).  soflow's loss drops
    labels whenever cfg_drop_rate > 0 and guides whenever cfg_scale != 1 or mix_ratio != 1, so the
    combinations below would train something else under the same names.  cfg_decay_time needs no
    check: g(t) is the same function in both for every value (>= 1 switches the decay off).
    """
    o, data = cfg.objective, cfg.data
    w, m, drop = o.cfg_scale, o.mix_ratio, o.cfg_drop_rate
    if not has_labels(data):
        set_keys = [f"objective.{k}={v}" for k, v, off in (("cfg_scale", w, 1), ("mix_ratio", m, 1),
                                                             ("cfg_drop_rate", drop, 0)) if v != off]
        if set_keys:
            fix = " or data.conditional=true" if data.name in ("fmnist", "cifar10") else ""
            raise ConfigError(f"{', '.join(set_keys)}: training-time guidance needs class labels, but data.name="
                              f"{data.name} gives none; set objective.cfg_scale=1, objective.mix_ratio=1 and "
                              f"objective.cfg_drop_rate=0{fix}")
        return
    if w < 1:
        raise ConfigError(f"objective.cfg_scale={w}: guidance scales below 1 are not trained (the reference guides "
                          "only above 1); set objective.cfg_scale=1 (no guidance) or a value above 1")
    if w == 1 and m != 1:
        raise ConfigError(f"objective.mix_ratio={m} with objective.cfg_scale=1: without guidance the reference "
                          "ignores mix_ratio while soflow would mix in the model's own velocity; set "
                          "objective.mix_ratio=1, or guide with objective.cfg_scale above 1")
    if w == 1 and drop > 0:
        raise ConfigError(f"objective.cfg_drop_rate={drop} with objective.cfg_scale=1: the reference drops labels "
                          "only when it guides (and refuses this pair); set objective.cfg_drop_rate=0, or guide "
                          "with objective.cfg_scale above 1")
    if w > 1 and drop == 0:
        raise ConfigError(f"objective.cfg_scale={w} with objective.cfg_drop_rate=0: the guided target needs the "
                          "unconditional velocity of the null class, which only label dropout trains; set "
                          "objective.cfg_drop_rate above 0 (the reference uses 0.1), or objective.cfg_scale=1")


def validate(cfg: Config, guidance: bool = True) -> Config:
    """Check every key; `guidance=False` skips the training-time guidance checks (for opening runs
    that were already trained)."""
    from ..nets import REGISTRY, canonical_name

    flat = {"method": cfg.method, "model.path": cfg.model.path, "model.parameterization": cfg.model.parameterization,
            "objective.schedule": cfg.objective.schedule, "train.optimizer": cfg.train.optimizer,
            "train.precision": cfg.train.precision, "train.device": cfg.train.device}
    for key, value in flat.items():
        if str(value).lower() not in CHOICES[key]:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(CHOICES[key])}")
    try:
        canonical_name(cfg.model.net)
    except ValueError:
        raise ConfigError(f"model.net: unknown network {cfg.model.net!r}; choose one of {', '.join(sorted(REGISTRY))}") from None
    _validate_finite(cfg)
    t, o = cfg.train, cfg.objective
    positive = {"train.total_steps": t.total_steps, "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
                "train.checkpoint_every": t.checkpoint_every, "train.log_every": t.log_every,
                "train.ema_every": t.ema_every, "train.keep_last": t.keep_last, "train.lr": t.lr,
                "train.sample_num": t.sample_num, "data.resolution": cfg.data.resolution,
                # the adaptive weights 1 / (mse + eps)^p stay finite and positive only for eps > 0
                "objective.eps": o.eps, "meanflow.c": cfg.meanflow.c, "flow_matching.eps": cfg.flow_matching.eps,
                "meanflow.time_std": cfg.meanflow.time_std, "flow_matching.time_std": cfg.flow_matching.time_std}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    non_negative = {"objective.p": o.p, "meanflow.p": cfg.meanflow.p, "flow_matching.p": cfg.flow_matching.p,
                    "train.weight_decay": t.weight_decay, "train.keep_every": t.keep_every,
                    "train.sample_every": t.sample_every, "data.num_workers": cfg.data.num_workers}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {value}")
    ranges = {"objective.velocity_loss_ratio": o.velocity_loss_ratio, "objective.cfg_drop_rate": o.cfg_drop_rate,
              "data.augment_p": cfg.data.augment_p,
              "objective.mix_ratio": o.mix_ratio, "train.ema_decay": t.ema_decay}
    for key, value in ranges.items():
        if not 0 <= value <= 1:
            raise ConfigError(f"{key}: must lie in [0, 1], got {value}")
    for key in ("time_mean", "time_std"):
        v = getattr(o, key)
        if len(v) != 3 or not all(_type_ok(x, float) for x in v):
            raise ConfigError(f"objective.{key}: expected 3 numbers [flow-matching t, consistency s, consistency t], got {v!r}")
    if not all(x > 0 for x in o.time_std):
        raise ConfigError(f"objective.time_std: the logit-normal spreads must be positive, got {o.time_std!r}")
    _validate_middle_ratio(o)
    if len(t.betas) != 2 or not all(_type_ok(x, float) for x in t.betas):
        raise ConfigError(f"train.betas: expected two numbers, got {t.betas!r}")
    if not all(0 <= x < 1 for x in t.betas):
        raise ConfigError(f"train.betas: Adam's decay rates must lie in [0, 1), got {t.betas!r}")
    for key in ("meanflow", "flow_matching"):  # re-run the loss's own checks on the set values
        section = getattr(cfg, key)
        try:
            type(section)(**dataclasses.asdict(section))
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
    if cfg.method == "meanflow" and (cfg.model.path, cfg.model.parameterization) != ("linear", "euler"):
        raise ConfigError("method=meanflow needs model.path=linear and model.parameterization=euler")
    if cfg.method == "meanflow" and t.fsdp:
        raise ConfigError("train.fsdp: not supported with method=meanflow (its JVP runs on the unwrapped network)")
    if not t.sample_nfe or not all(_type_ok(x, int) and x >= 1 for x in t.sample_nfe):
        raise ConfigError(f"train.sample_nfe: expected a list of positive integers, got {t.sample_nfe!r}")
    if t.threads < 0:
        raise ConfigError(f"train.threads: must be 0 (choose by network size) or a positive count, got {t.threads}")
    _validate_fid(cfg)
    from ..data import DATASETS

    if cfg.data.name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset {cfg.data.name!r}; choose one of {', '.join(DATASETS)}")
    if guidance and cfg.method == "soflow":
        _validate_guidance(cfg)
    return cfg


def _first_non_finite(value, key: str):
    """(dotted key, value) of the first nan or infinite number in `value`, searching nested mappings
    and lists (net_args included), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (key, value)
    if isinstance(value, dict):
        items = ((f"{key}.{k}" if key else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{key}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub_key, sub in items:
        found = _first_non_finite(sub, sub_key)
        if found:
            return found
    return None


def _validate_finite(cfg: Config) -> None:
    """No setting means anything as nan or infinity, and nan would slip through every range check below."""
    found = _first_non_finite(cfg.to_dict(), "")
    if found:
        raise ConfigError(f"{found[0]}: must be a finite number, got {found[1]}")


def _validate_middle_ratio(o: ObjectiveConfig) -> None:
    """r(k, K) places the middle time l = t + (s - t) r between s (r = 1) and t (r = 0), so every
    schedule needs r_init and r_end in [0, 1]; the exponent schedule r_init (r_end / r_init)^(k / K)
    also divides by r_init and takes powers of the ratio, so both must be above 0."""
    for key in ("r_init", "r_end"):
        value = getattr(o, key)
        if not 0 <= value <= 1:
            raise ConfigError(f"objective.{key}: must lie in [0, 1] (the middle time sits between s and t), "
                              f"got {value}")
        if str(o.schedule).lower() == "exponent" and value == 0:
            raise ConfigError(f"objective.{key}: the exponent schedule needs r_init and r_end above 0, got 0; "
                              "use a small positive value or objective.schedule=linear")


def _validate_fid(cfg: Config) -> None:
    """The FID settings that can be checked without touching files (those are checked when training starts)."""
    t = cfg.train
    if t.fid_every < 0:
        raise ConfigError(f"train.fid_every: must be 0 (off) or a positive number of steps, got {t.fid_every}")
    if t.fid_num < 2:
        raise ConfigError(f"train.fid_num: a covariance needs at least 2 samples, got {t.fid_num}")
    if t.fid_batch_size < 1:
        raise ConfigError(f"train.fid_batch_size: must be positive, got {t.fid_batch_size}")
    if not t.fid_nfe or not all(_type_ok(x, int) and x >= 1 for x in t.fid_nfe):
        raise ConfigError(f"train.fid_nfe: expected a list of positive integers, got {t.fid_nfe!r}")
    if len(set(t.fid_nfe)) != len(t.fid_nfe):
        raise ConfigError(f"train.fid_nfe: {t.fid_nfe!r} repeats an entry")
    if t.fid_dims not in (64, 192, 768, 2048):
        raise ConfigError(f"train.fid_dims: {t.fid_dims} is not an Inception feature size; choose 2048 (standard FID), "
                          "768, 192 or 64")
    if t.fid_every and not t.fid_ref:
        raise ConfigError("train.fid_ref: train.fid_every > 0 needs reference statistics: "
                          "--set train.fid_ref=REF.npz (from `soflow fid ref`, or ADM's reference batch)")
    from ..data import DATASETS, IMAGE_DATASETS

    if t.fid_every and cfg.data.name in DATASETS and cfg.data.name not in IMAGE_DATASETS:
        raise ConfigError(f"train.fid_every: FID needs image data; data.name={cfg.data.name} is not one of "
                          f"{', '.join(IMAGE_DATASETS)}")


# ---------------------------------------------------------------- sources

# A preset file with a `variants` mapping is a template, not a preset: each entry NAME is the preset
# `<file stem>-NAME`, that is the file's other keys with the entry's keys laid over them.
VARIANTS = "variants"


def _variants(path: Path) -> dict:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data.get(VARIANTS) or {} if isinstance(data, dict) else {}


def preset_names() -> list[str]:
    names = []
    for path in PRESET_DIR.glob("*.yaml"):
        variants = _variants(path)
        names += [f"{path.stem}-{v}" for v in variants] if variants else [path.stem]
    return sorted(names)


def _template_of(name: str) -> tuple[Path, str] | None:
    """(template file, variant) of a preset made from a template, else None."""
    for path in PRESET_DIR.glob("*.yaml"):
        variant = name[len(path.stem) + 1:]
        if name.startswith(path.stem + "-") and variant in _variants(path):
            return path, variant
    return None


def _laid_over(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _laid_over(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(source: str) -> dict:
    path = Path(source)
    if path.is_dir():
        raise ConfigError(f"--config {source}: is a folder; give a YAML file or a preset name")
    variant = None
    if not path.is_file():
        if (PRESET_DIR / f"{source}.yaml").is_file():
            path = PRESET_DIR / f"{source}.yaml"
        elif _template_of(source) is not None:
            path, variant = _template_of(source)
        else:
            raise ConfigError(f"--config {source!r}: no such file or preset; presets: {', '.join(preset_names())}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML file (not UTF-8 text); give a YAML config or a preset name") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:  # an empty file (or only comments) would silently train on every default
        raise ConfigError(f"{path}: the file is empty; a config is a YAML mapping of keys (see the presets)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if VARIANTS in data:
        variants = data.pop(VARIANTS)
        if variant is None or not isinstance(variants, dict):
            names = ", ".join(f"{path.stem}-{v}" for v in variants) if isinstance(variants, dict) else "none"
            raise ConfigError(f"{path}: a template of presets ({names}); give one of them to --config")
        data = _laid_over(data, variants[variant])
    return data


def load(source: str | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Defaults <- `base` (e.g. a saved run config) <- preset/YAML `source` <- overrides.

    The guidance checks apply when a preset, YAML or override is given: a saved run config alone
    (opening a finished run for sampling) is taken as it was trained.
    """
    cfg = Config()
    if base:
        apply(cfg, base)
    if source is not None:
        data = read_yaml(source)
        apply(cfg, from_reference(data) if is_reference(data) else data)
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value)
    return validate(cfg, guidance=source is not None or bool(overrides))


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- paths a command will write to

RUN_FOLDERS = ("checkpoints", "exports", "samples")  # created by training when first needed
RUN_FILES = ("config.yaml", "log.txt", "metrics.jsonl")  # rewritten or appended to at every start


def unwritable(folder: str | Path) -> str | None:
    """Why files cannot be created in `folder` (when it does not exist yet: in the nearest existing
    folder above it, where it would be created), or None when they can.  Checked up front so that a
    command fails before its work rather than when it first saves."""
    probe = Path(folder)
    while not (probe.exists() or probe.is_symlink()) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is {'a file, not a folder' if probe.is_file() else 'not a folder'}"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def check_run_dir(run_dir: str | Path) -> None:
    """Refuse, before any training step, a run folder whose checkpoints, exports, samples or logs
    could not be written (a read-only folder, or a file where a folder belongs)."""
    run_dir = Path(run_dir)
    problem = unwritable(run_dir)
    for name in RUN_FOLDERS:
        sub = run_dir / name
        if problem is None and (sub.exists() or sub.is_symlink()):
            problem = unwritable(sub)
    for name in RUN_FILES:
        file = run_dir / name
        if problem is None and file.is_dir():
            problem = f"{file} is a folder, not a file"
        elif problem is None and file.exists() and not os.access(file, os.W_OK):
            problem = f"{file} is not writable"
    if problem:
        raise ConfigError(f"--run-dir {run_dir}: cannot write the run there: {problem}")


# ---------------------------------------------------------------- the reference implementation's YAML

REFERENCE_KEYS = {
    "working_dir", "noising_type", "coefficient_type", "model_type", "dataset_type", "data_size", "dataset_path",
    "velocity_loss_ratio", "p", "eps", "time_mean", "time_std", "cfg_scale", "mix_ratio", "cfg_drop_rate",
    "cfg_decay_time", "l_schedule", "l_init_ratio", "l_end_ratio", "total_steps", "ema_decay_rate",
    "learning_rate", "betas", "weight_decay", "batch_size", "num_workers", "prefetch_factor", "eval_steps",
    "eval_batch_size", "eval_NFE", "eval_demo_steps", "eval_demo_shape", "ckpt_saving_steps", "logging_steps", "seed",
}
REFERENCE_DATASETS = {"CIFAR10": "cifar10", "Imagenet": "imagenet-latents"}
REFERENCE_MODELS = {"UNet": "unet-cifar10", "DiT-B-4": "dit-b4", "DiT-B-2": "dit-b2", "DiT-M-2": "dit-m2",
                    "DiT-L-2": "dit-l2", "DiT-XL-2": "dit-xl2"}


def is_reference(data: dict) -> bool:
    return "model_type" in data or "noising_type" in data


def from_reference(data: dict) -> dict:
    """Translate a reference YAML (flat keys) into soflow's nested keys, with the reference
    trainer's per-dataset choices (RAdam and float64 EMA every 16 steps on CIFAR-10)."""
    unknown = sorted(set(data) - REFERENCE_KEYS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in a reference-style config (it has model_type / noising_type)")
    for key, table in (("model_type", REFERENCE_MODELS), ("dataset_type", REFERENCE_DATASETS)):
        if key in data and data[key] not in table:
            raise ConfigError(f"{key}: {data[key]!r} is not one of {', '.join(table)}")
    out: dict = {}
    moves = {
        "noising_type": "model.path", "coefficient_type": "model.parameterization",
        "dataset_path": "data.path", "num_workers": "data.num_workers", "prefetch_factor": "data.prefetch_factor",
        "velocity_loss_ratio": "objective.velocity_loss_ratio", "p": "objective.p", "eps": "objective.eps",
        "time_mean": "objective.time_mean", "time_std": "objective.time_std", "cfg_scale": "objective.cfg_scale",
        "mix_ratio": "objective.mix_ratio", "cfg_drop_rate": "objective.cfg_drop_rate",
        "cfg_decay_time": "objective.cfg_decay_time", "l_schedule": "objective.schedule",
        "l_init_ratio": "objective.r_init", "l_end_ratio": "objective.r_end", "total_steps": "train.total_steps",
        "ema_decay_rate": "train.ema_decay", "learning_rate": "train.lr", "betas": "train.betas",
        "weight_decay": "train.weight_decay", "batch_size": "train.batch_size", "seed": "train.seed",
        "ckpt_saving_steps": "train.checkpoint_every", "logging_steps": "train.log_every",
        "eval_demo_steps": "train.sample_every",
    }
    for src, dst in moves.items():
        if src in data:
            value = data[src]
            if src in ("noising_type", "coefficient_type", "l_schedule") and isinstance(value, str):
                value = value.lower()
            out[dst] = value
    if "ckpt_saving_steps" in data:  # the reference keeps every checkpoint it writes
        out["train.keep_every"] = data["ckpt_saving_steps"]
    if "model_type" in data:
        out["model.net"] = REFERENCE_MODELS[data["model_type"]]
    if "eval_NFE" in data:
        nfe = data["eval_NFE"]
        out["train.sample_nfe"] = list(nfe) if isinstance(nfe, (list, tuple)) else [nfe]
    dataset = REFERENCE_DATASETS.get(data.get("dataset_type"))
    if dataset:
        out["data.name"] = dataset
    if dataset == "cifar10":  # unconditional, EDM augmentation with 6 augment labels
        out.update({"train.optimizer": "radam", "train.ema_every": 16, "train.ema_float64": True,
                    "data.conditional": False, "data.augment_p": 0.12})
    elif dataset == "imagenet-latents":
        out["train.optimizer"] = "adamw"
    return out
