"""Loading the reference implementation's checkpoints into soflow networks.

A reference checkpoint is a `torch.save` dict {'model', 'ema_model', 'optimizer',
'finished_steps', 'finished_epochs'} whose model entries hold the network under a `network.`
prefix.  soflow's networks use the reference module names, so conversion strips the prefix and
checks every name and shape; anything else is an error naming the first offending tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

PREFIX = "network."
CHECKPOINT_KEYS = ("ema_model", "model")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the network."""


def read_reference_blob(path: str | Path) -> dict:
    """The whole reference checkpoint dict, loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holds non-tensor objects
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(blob, dict) or not any(k in blob for k in CHECKPOINT_KEYS):
        keys = ", ".join(map(str, blob)) if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(f"{path}: found {keys}; expected a reference checkpoint with {', '.join(CHECKPOINT_KEYS)}")
    return blob


def network_state(blob: dict, which: str, source: str) -> dict[str, Tensor]:
    if which not in blob:
        raise CheckpointError(f"{source}: no {which!r} entry (found {', '.join(map(str, blob))})")
    return strip_prefix(blob[which], source=source)


def read_reference_checkpoint(path: str | Path, which: str = "ema_model") -> dict[str, Tensor]:
    """The network tensors of a reference checkpoint (EMA by default), prefix stripped."""
    return network_state(read_reference_blob(path), which, str(path))


def strip_prefix(state: dict[str, Tensor], source: str = "state dict") -> dict[str, Tensor]:
    if not state or not all(k.startswith(PREFIX) for k in state):
        raise CheckpointError(f"{source}: expected every tensor name to start with {PREFIX!r}")
    return {k[len(PREFIX):]: v for k, v in state.items()}


def load_into(net: nn.Module, state: dict[str, Tensor], source: str = "state dict") -> nn.Module:
    """Copy `state` into `net`, requiring the same names and shapes."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    problems = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
               ([f"unexpected {', '.join(unexpected[:3])}"] if unexpected else []) + \
               ([f"shape {', '.join(wrong[:3])}"] if wrong else [])
    if problems:
        raise CheckpointError(f"{source} does not fit {type(net).__name__}: {'; '.join(problems)}")
    net.load_state_dict(state, strict=True, assign=any(p.is_meta for p in net.parameters()))
    return net


def network_from_reference_args(kind: str, args: dict) -> nn.Module:
    """Build the soflow network for the reference constructor arguments of a DiT or SongUNet."""
    from .nets import DiT, SongUNet

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
    from .nets import build, canonical_name

    state = read_reference_checkpoint(path, which)
    name = canonical_name(model_type)
    table = state.get("y_embedder.embedding_table.weight")
    if name.startswith("dit") and table is not None:
        overrides.setdefault("null_class", table.shape[0] == overrides.get("num_classes", 1000) + 1)
    return load_into(build(name, **overrides), state, source=str(path))


def convert_reference_run(checkpoint: str | Path, config: str | Path, out: str | Path) -> Path:
    """A soflow run folder (config.yaml + checkpoints/) from a reference checkpoint and its YAML.

    Model and EMA weights carry over; the optimizer state starts fresh and the step is the
    reference's `finished_steps`, so training resumes on the same schedule r(k, K).
    """
    from .train.build import build_flow
    from .train.checkpoint import FORMAT, atomic_save, checkpoint_dir
    from .train.config import dump, load

    cfg = load(str(config))
    data_shape = {"cifar10": (3, 32, 32), "imagenet-latents": (4, 32, 32)}.get(cfg.data.name)
    if data_shape is None:
        raise CheckpointError(f"{config}: dataset {cfg.data.name!r} is not one of the reference datasets")
    num_classes = 1000 if cfg.data.name == "imagenet-latents" else 0
    path = Path(checkpoint)
    blob = read_reference_blob(path)
    online, ema = network_state(blob, "model", str(path)), network_state(blob, "ema_model", str(path))
    flow = build_flow(cfg, data_shape, num_classes)
    load_into(flow.net, online, source=f"{path} (model)")
    load_into(flow.net, ema, source=f"{path} (ema_model)")
    step = int(blob.get("finished_steps", 0))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump(cfg))
    atomic_save({"format": FORMAT, "step": step, "config": cfg.to_dict(), "sample_shape": list(data_shape),
                 "num_classes": num_classes, "net": online, "ema": ema, "optimizer": {}, "rng": [],
                 "world_size": 0}, checkpoint_dir(out) / f"ckpt-{step:08d}.pt")
    return out
