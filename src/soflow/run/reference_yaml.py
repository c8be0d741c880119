"""The reference implementation's flat YAML configs, translated into soflow's nested keys."""

from __future__ import annotations

from ..errors import ConfigError

REFERENCE_KEYS = {
    "working_dir", "noising_type", "coefficient_type", "model_type", "dataset_type", "data_size", "dataset_path",
    "velocity_loss_ratio", "p", "eps", "time_mean", "time_std", "cfg_scale", "mix_ratio", "cfg_drop_rate",
    "cfg_decay_time", "l_schedule", "l_init_ratio", "l_end_ratio", "total_steps", "ema_decay_rate",
    "learning_rate", "betas", "weight_decay", "batch_size", "num_workers", "prefetch_factor", "eval_steps",
    "eval_batch_size", "eval_NFE", "eval_demo_steps", "eval_demo_shape", "ckpt_saving_steps", "logging_steps", "seed",
}
REFERENCE_DATASETS = {"CIFAR10": "cifar10", "Imagenet": "imagenet-latents"}
# the sample shape and number of classes of the reference's runs on each of its datasets:
# unconditional CIFAR-10 images, class-conditional ImageNet-256 SD-VAE latents
REFERENCE_SAMPLES = {"cifar10": ((3, 32, 32), 0), "imagenet-latents": ((4, 32, 32), 1000)}
REFERENCE_MODELS = {"UNet": "unet-cifar10", "DiT-B-4": "dit-b4", "DiT-B-2": "dit-b2", "DiT-M-2": "dit-m2",
                    "DiT-L-2": "dit-l2", "DiT-XL-2": "dit-xl2"}


def is_reference(data: dict) -> bool:
    """Whether a YAML mapping is a reference implementation config (flat keys)."""
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
    out["train.sample_mode"] = "renoise"  # the reference's k-step sampler, for its figures and FID
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
