"""`train.init`: the starting weights of a new run, taken from another model.

A source is a soflow run folder (its newest readable checkpoint), a checkpoint file, a safetensors
export, a pipeline folder, an authors' SoFlow checkpoint or a SiT checkpoint (soflow.sit), of any
training method, as long as the network is the same (a network that takes the guidance scale
as an input may start from one that does not: its zero-output embedder is kept).  The EMA weights of the source are used:
they are what the source's owner samples with.  Every file is read with safetensors or
`weights_only=True`.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, UnreadableFile
from ..nets.dit import GUIDANCE_EMBEDDER
from ..reference import PREFIX
from ..safeload import load_safetensors, load_torch
from ..sit import sit_state_of, sit_to_soflow
from .checkpoint import FORMAT, latest_checkpoint, list_checkpoints, read_checkpoint
from .load import tensor_misfits

PIPELINE_WEIGHTS = "model.safetensors"


def initial_weights(source: str | Path, net: nn.Module) -> tuple[dict[str, Tensor], str]:
    """(state dict for `net`, what it is) from `source`'s EMA weights; one CheckpointError line
    naming the first tensor that does not fit."""
    path = Path(source)
    state, kind = _read(path, net)
    state = with_own_guidance_embedder(net, state)
    misfits = tensor_misfits(net, state)
    if misfits:
        raise CheckpointError(f"train.init {path}: the {kind} does not fit this run's network: {misfits}; "
                              "start from a model of the same network (model.net, model.net_args, data)")
    return state, kind


def with_own_guidance_embedder(net: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` with the network's own guidance-embedder tensors where the file has none: a model
    without guidance as an input (fixed-scale, flow matching) starts a run that has it, and the
    embedder's zero output layer makes the network compute exactly what the source did."""
    prefix = GUIDANCE_EMBEDDER + "."
    own = {k: v for k, v in net.state_dict().items() if k.startswith(prefix)}
    if not own or any(k.startswith(prefix) for k in state):
        return state
    return {**state, **{k: v.detach().clone() for k, v in own.items()}}


def _read(path: Path, net: nn.Module) -> tuple[dict[str, Tensor], str]:
    if path.is_dir():
        if (path / PIPELINE_WEIGHTS).is_file():
            return _safetensors(path / PIPELINE_WEIGHTS), "pipeline folder"
        if list_checkpoints(path):
            blob = latest_checkpoint(path, warn=lambda m: None)
            if blob is None:
                raise CheckpointError(f"train.init {path}: every checkpoint of this run is unreadable")
            return blob["ema"], f"run folder (EMA of {Path(blob['path']).name})"
        raise CheckpointError(f"train.init {path}: a folder with neither checkpoints/ nor {PIPELINE_WEIGHTS}")
    if not path.is_file():
        raise CheckpointError(f"train.init {path}: no such file or folder")
    if path.suffix == ".safetensors":
        return _safetensors(path), "safetensors export"
    return _torch_file(path, net)


def _safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_safetensors(path)[0]
    except UnreadableFile as e:
        raise CheckpointError(f"train.init {path}: not a readable safetensors file ({e})") from None


def _torch_file(path: Path, net: nn.Module) -> tuple[dict[str, Tensor], str]:
    try:
        blob = load_torch(path, allow=(argparse.Namespace,))
    except UnreadableFile as e:
        raise CheckpointError(f"train.init {path}: not a readable checkpoint ({e})") from None
    if isinstance(blob, dict) and blob.get("format") == FORMAT:
        return read_checkpoint(path)["ema"], "soflow checkpoint (EMA)"
    if isinstance(blob, dict) and isinstance(blob.get("ema_model"), dict):
        state = blob["ema_model"]
        if state and all(str(k).startswith(PREFIX) for k in state):
            return {k[len(PREFIX):]: v for k, v in state.items()}, "authors' SoFlow checkpoint (EMA)"
    sit = sit_state_of(blob, f"train.init {path}")
    if sit is not None:
        return sit_to_soflow(sit, net, f"train.init {path}"), "SiT checkpoint (EMA, converted)"
    raise CheckpointError(f"train.init {path}: not a soflow, authors' SoFlow or SiT checkpoint; give a run folder, "
                          "a ckpt-*.pt, a .safetensors export, a pipeline folder or a SiT .pt")


def weights_sha256(state: dict[str, Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes, without a copy
    return digest.hexdigest()
