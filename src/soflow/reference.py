"""Loading the reference implementation's checkpoints into soflow networks.

A reference checkpoint is a `torch.save` dict {'model', 'ema_model', 'optimizer',
'finished_steps', 'finished_epochs'} whose model entries hold the network under a `network.`
prefix.  soflow's networks use the reference module names, so conversion strips the prefix and
checks every name and shape; anything else is an error naming the first offending tensors.
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import Tensor, nn

from .errors import CheckpointError, UnreadableFile
from .nets import DiT, SongUNet, build, canonical_name
from .nets.registry import load_into  # noqa: F401  (part of this module's API)
from .run.build import build_flow, build_optimizer
from .run.checkpoint import FORMAT, atomic_save, checkpoint_dir, run_state
from .run.config import Config, dump, load
from .run.reference_yaml import REFERENCE_SAMPLES
from .safeload import load_torch
from .sit import load_sit_network  # noqa: F401

PREFIX = "network."
CHECKPOINT_KEYS = ("ema_model", "model")


def read_reference_blob(path: str | Path) -> dict:
    """The whole reference checkpoint dict, loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        blob = load_torch(path)
    except UnreadableFile as e:  # holds objects beyond tensors (possibly code), truncated, or not a torch file
        if e.holds_objects:
            raise CheckpointError(f"{path}: not a reference checkpoint: {e}") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from None
    if not isinstance(blob, dict) or not any(k in blob for k in CHECKPOINT_KEYS):
        keys = ", ".join(map(str, blob)) if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(f"{path}: found {keys}; expected a reference checkpoint with {', '.join(CHECKPOINT_KEYS)}")
    return blob


def network_state(blob: dict, which: str, source: str) -> dict[str, Tensor]:
    """The network tensors of the `which` entry of a reference checkpoint dict, prefix stripped."""
    if which not in blob:
        raise CheckpointError(f"{source}: no {which!r} entry (found {', '.join(map(str, blob))})")
    return strip_prefix(blob[which], source=source)


def read_reference_checkpoint(path: str | Path, which: str = "ema_model") -> dict[str, Tensor]:
    """The network tensors of a reference checkpoint (EMA by default), prefix stripped."""
    return network_state(read_reference_blob(path), which, str(path))


def strip_prefix(state: dict[str, Tensor], source: str = "state dict") -> dict[str, Tensor]:
    """A reference state dict with the `network.` prefix taken off every name."""
    if not state or not all(k.startswith(PREFIX) for k in state):
        raise CheckpointError(f"{source}: expected every tensor name to start with {PREFIX!r}")
    return {k[len(PREFIX):]: v for k, v in state.items()}


def network_from_reference_args(kind: str, args: dict) -> nn.Module:
    """Build the soflow network for the reference constructor arguments of a DiT or SongUNet."""
    args = dict(args)
    if kind == "dit":
        if args.pop("learn_sigma", False):
            raise CheckpointError("learn_sigma=True DiTs predict a variance; solution networks do not")
        drop = args.pop("class_dropout_prob", 0.0)
        return DiT(**args, null_class=drop > 0)
    if kind == "unet":
        fixed = {"embedding_type": "positional", "encoder_type": "standard", "decoder_type": "standard",
                 "label_dropout": 0}
        for key, value in fixed.items():
            if args.pop(key, value) != value:
                raise CheckpointError(f"U-Net {key}={args.get(key)!r} is not supported (only {value!r})")
        return SongUNet(**args)
    raise CheckpointError(f"unknown reference network kind {kind!r}; expected 'dit' or 'unet'")


def load_reference_network(path: str | Path, model_type: str, which: str = "ema_model", **overrides) -> nn.Module:
    """A registry network (`model_type` as in the reference configs, e.g. 'DiT-XL-2' or 'UNet')
    with the weights of a reference checkpoint.  A DiT's null-class row is inferred from the
    checkpoint's label table."""
    state = read_reference_checkpoint(path, which)
    name = canonical_name(model_type)
    table = state.get("y_embedder.embedding_table.weight")
    if name.startswith("dit") and table is not None:
        overrides.setdefault("null_class", table.shape[0] == overrides.get("num_classes", 1000) + 1)
    return load_into(build(name, **overrides), state, source=str(path))


def convert_reference_run(checkpoint: str | Path, config: str | Path, out: str | Path) -> Path:
    """A soflow run folder (config.yaml + checkpoints/) from a reference checkpoint and its YAML.

    Model, EMA and optimizer state carry over: `soflow train` continues the run with its Adam/RAdam
    moments and step counts, from the reference's `finished_steps`, so on the same schedule r(k, K).
    """
    cfg = load(str(config))
    if cfg.data.name not in REFERENCE_SAMPLES:
        raise CheckpointError(f"{config}: dataset {cfg.data.name!r} is not one of the reference datasets")
    data_shape, num_classes = REFERENCE_SAMPLES[cfg.data.name]
    path = Path(checkpoint)
    blob = read_reference_blob(path)
    online, ema = network_state(blob, "model", str(path)), network_state(blob, "ema_model", str(path))
    flow = build_flow(cfg, data_shape, num_classes)
    load_into(flow.net, ema, source=f"{path} (ema_model)")
    load_into(flow.net, online, source=f"{path} (model)")
    optimizer = convert_optimizer(blob.get("optimizer"), flow.net, list(online), cfg, source=str(path))
    step = int(blob.get("finished_steps", 0))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump(cfg))
    atomic_save({"format": FORMAT, **run_state(step, cfg.to_dict(), data_shape, num_classes, online, ema, optimizer)},
                checkpoint_dir(out) / f"ckpt-{step:08d}.pt")
    return out


# The per-parameter state tensors of the reference optimizers (AdamW on ImageNet, RAdam on CIFAR-10).
MOMENTS = ("exp_avg", "exp_avg_sq")
# Param-group hyperparameters soflow's optimizer is built with: the config key that sets each, if any.
HYPERPARAMETERS = {"lr": "train.lr (learning_rate in a reference YAML)", "betas": "train.betas",
                   "weight_decay": "train.weight_decay", "eps": None, "amsgrad": None, "maximize": None}


def convert_optimizer(state: object, net: nn.Module, reference_order: list[str], cfg: Config, source: str) -> dict:
    """A reference optimizer state_dict as soflow's optimizer over `net.parameters()` saves it.

    The reference optimizes `network.parameters()`, so its state is keyed by each parameter's
    position in that list, which is the order of the parameter names in `reference_order` (the
    keys of its `model` state dict).  The moments are checked against the parameters' shapes and
    the param-group hyperparameters against the config; an empty state gives {} (a fresh optimizer).
    """
    if state is None or state == {}:
        return {}
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) \
            or not isinstance(state.get("param_groups"), list):
        raise CheckpointError(f"{source}: 'optimizer' is not a torch optimizer state_dict "
                              "(expected 'state' and 'param_groups')")
    params = dict(net.named_parameters())
    names = [k for k in reference_order if k in params]  # reference position -> parameter name
    groups = state["param_groups"]
    ids = [i for g in groups if isinstance(g, dict) for i in g.get("params", [])]
    if len(groups) != 1 or len(ids) != len(names) or len(set(ids)) != len(ids):
        raise CheckpointError(f"{source}: the optimizer state covers {len(ids)} parameters in {len(groups)} "
                              f"group(s), but {type(net).__name__} has {len(names)} parameters in one group")
    fresh = build_optimizer(cfg, net.parameters())
    group = fresh.state_dict()["param_groups"][0]
    _check_hyperparameters(groups[0], group, cfg.train.optimizer, source)
    name_of = dict(zip(ids, names))
    position = {name: i for i, name in enumerate(params)}  # soflow's key of each parameter
    converted = {}
    for pid, entry in state["state"].items():
        if pid not in name_of:
            raise CheckpointError(f"{source}: optimizer state for parameter {pid!r}, which no param group lists")
        name = name_of[pid]
        _check_moments(entry, name, params[name], source)
        converted[position[name]] = entry
    if not converted:
        return {}  # saved before the first step: nothing to carry over
    # After a step every trained parameter has moments; one without them would restart its own.
    missing = [n for n, p in params.items() if p.requires_grad and position[n] not in converted]
    if missing:
        raise CheckpointError(f"{source}: the optimizer state has no moments for {missing[0]}"
                              + (f" and {len(missing) - 1} more parameters" if len(missing) > 1 else "")
                              + f"; it does not belong to this {type(net).__name__}")
    try:
        fresh.load_state_dict({"state": converted, "param_groups": [group]})
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{source}: the optimizer state does not load ({str(e).splitlines()[0]})") from None
    return fresh.state_dict()


def _check_hyperparameters(saved: dict, own: dict, kind: str, source: str) -> None:
    # Adam and AdamW groups carry `amsgrad`, RAdam's never do (torch 2.0 onwards).
    if ("amsgrad" in saved) != ("amsgrad" in own):
        theirs, fix = ("Adam(W)", "adamw") if "amsgrad" in saved else ("RAdam", "radam")
        raise CheckpointError(f"{source}: the optimizer state is {theirs}'s but train.optimizer is {kind}; "
                              f"set train.optimizer={fix}")
    for key, config_key in HYPERPARAMETERS.items():
        if key not in saved or key not in own:
            continue
        a, b = saved[key], own[key]
        same = (len(a) == len(b) and all(math.isclose(float(x), float(y), rel_tol=1e-9) for x, y in zip(a, b))
                if isinstance(b, (tuple, list)) else math.isclose(float(a), float(b), rel_tol=1e-9))
        if not same:
            shown = list(a) if isinstance(a, (tuple, list)) else a
            if config_key:
                raise CheckpointError(f"{source}: optimizer {key} {shown} differs from the config's {b}; "
                                      f"set {config_key} to {shown} to continue the run")
            raise CheckpointError(f"{source}: optimizer {key} {shown} differs from soflow's {b}, which no "
                                  "config key changes")


def _check_moments(entry, name: str, param: Tensor, source: str) -> None:
    if not isinstance(entry, dict) or any(k not in entry for k in ("step", *MOMENTS)):
        found = ", ".join(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
        raise CheckpointError(f"{source}: optimizer state of {name} has {found}; expected step, {', '.join(MOMENTS)}")
    for key, value in entry.items():
        if key == "step":
            if isinstance(value, Tensor) and value.numel() != 1:
                raise CheckpointError(f"{source}: optimizer step of {name} has shape {tuple(value.shape)}; expected a number")
        elif not isinstance(value, Tensor) or value.shape != param.shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise CheckpointError(f"{source}: optimizer {key} of {name} has shape {shape}, the parameter "
                                  f"{tuple(param.shape)}")
