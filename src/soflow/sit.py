"""SiT checkpoints (Ma et al. 2024) as soflow DiTs: an exact change of conventions, nothing learned.

SiT is a flow-matching DiT with the opposite time direction: its interpolant is
x_tau = tau x_data + (1 - tau) noise, so tau = 1 is data, and its network predicts
d x_tau / d tau = x_data - noise.  soflow's time is t = 1 - tau and its velocity is
d x_t / d t = noise - x_data.  A soflow DiT whose network satisfies

    F(x, t, t, y) = -SiT(x, 1 - t, y)                                             (S1)

therefore has SiT's velocity field.  Both networks embed the raw time with the same sinusoidal
features e(t) = [cos(t w_i), sin(t w_i)], and the angle-difference identities

    cos((1 - t) w) =  cos(w) cos(t w) + sin(w) sin(t w)
    sin((1 - t) w) =  sin(w) cos(t w) - cos(w) sin(t w)                          (S2)

make e(1 - t) = M e(t) a fixed linear map, so the first layer of the time MLP absorbs it:
W1' = W1 M.  The sign of (S1) goes into the output layer, whose variance half (`learn_sigma`) is
dropped.  The gap embedder, which SiT lacks, keeps a random first layer and a zero last layer: it
adds exactly zero at the start and its last layer still receives gradient.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointError, UnreadableFile
from .nets import DiT, build, canonical_name
from .nets.registry import load_into
from .safeload import load_torch

# Tensors every SiT state dict has; a file without them is not a SiT checkpoint.
SIT_KEYS = ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "final_layer.linear.weight", "pos_embed")
TIME_IN = "t_embedder.mlp.0.weight"
OUTPUT = ("final_layer.linear.weight", "final_layer.linear.bias")
GAP_OUT = ("s_embedder.mlp.2.weight", "s_embedder.mlp.2.bias")


def is_sit_state(state: object) -> bool:
    """A SiT network state dict: DiT names without the gap embedder."""
    return (isinstance(state, dict) and all(isinstance(state.get(k), Tensor) for k in SIT_KEYS)
            and not any(str(k).startswith("s_embedder.") for k in state))


def sit_state_of(blob: Any, source: str) -> dict[str, Tensor] | None:
    """SiT's network tensors in a loaded file, or None if it is no SiT file: the released bare state
    dict, or the EMA weights of train.py's {'model', 'ema', 'opt', 'args'}."""
    if is_sit_state(blob):
        return blob
    if isinstance(blob, dict) and "ema" in blob and "args" in blob:
        if not is_sit_state(blob["ema"]):
            raise CheckpointError(f"{source}: its 'ema' entry is not a SiT network (expected {', '.join(SIT_KEYS)})")
        return blob["ema"]
    return None


def read_sit_state(path: str | Path) -> dict[str, Tensor]:
    """SiT's EMA network tensors from either file kind it writes (weights_only=True; train.py's
    `args` Namespace is the one class allowed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such SiT checkpoint file")
    try:
        blob = load_torch(path, allow=(argparse.Namespace,))
    except UnreadableFile as e:
        raise CheckpointError(f"{path}: not a readable SiT checkpoint ({e})") from None
    state = sit_state_of(blob, str(path))
    if state is None:
        found = ", ".join(list(map(str, blob))[:5]) if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(f"{path}: not a SiT checkpoint (found {found}; expected a DiT state dict with "
                              f"{SIT_KEYS[0]}, or train.py's 'ema' and 'args')")
    return state


def time_reversal(freq_dim: int, max_period: float = 10000.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """M [freq_dim, freq_dim] in float64 with e(1 - t) = M e(t) for the sinusoidal features (S2), for
    the frequencies as `timestep_embedding` computes them in `dtype` (float32 in the networks)."""
    if freq_dim % 2:
        raise CheckpointError(f"a time embedding of odd size {freq_dim} has no exact time reversal")
    half = freq_dim // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype) / half).double()
    c, s = torch.diag(torch.cos(w)), torch.diag(torch.sin(w))
    return torch.cat([torch.cat([c, s], 1), torch.cat([s, -c], 1)], 0)


def sit_dit_args(state: dict[str, Tensor]) -> dict:
    """The DiT arguments that SiT's tensor shapes fix (all but num_heads).  SiT adds the null-class
    row only when it trains with label dropout, so a table of odd size reads as classes + null
    (ImageNet: 1001 rows); pass num_classes and null_class to load_sit_network otherwise."""
    hidden, channels, patch, _ = state["x_embedder.proj.weight"].shape
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    table = state.get("y_embedder.embedding_table.weight")
    rows = 0 if table is None else table.shape[0]
    num_classes = rows - 1 if rows and rows % 2 else rows  # SiT adds the null row only with label dropout
    return dict(input_size=int(round(math.sqrt(state["pos_embed"].shape[1]))) * patch, patch_size=patch,
                in_channels=channels, hidden_size=hidden, depth=depth,
                mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden if depth else 4.0,
                num_classes=num_classes, null_class=rows > num_classes)


def sit_to_soflow(state: dict[str, Tensor], net: nn.Module, source: str = "SiT checkpoint") -> dict[str, Tensor]:
    """SiT tensors as the state dict of the soflow DiT `net` with (S1): time MLP input through M,
    the mean half of the output negated, the gap embedder's first layer from `net` and its last zero."""
    if not isinstance(net, DiT):
        raise CheckpointError(f"{source}: a SiT checkpoint fits DiT networks only, not {type(net).__name__}")
    out = {k: v for k, v in state.items() if k not in (TIME_IN, *OUTPUT)}
    w1 = state[TIME_IN]
    out[TIME_IN] = (w1.double() @ time_reversal(w1.shape[1]).to(w1.device)).to(w1.dtype)
    p, c = net.patch_size, net.out_channels
    weight, bias = (state[k] for k in OUTPUT)
    per_position = weight.shape[0] // (p * p)
    if weight.shape[0] % (p * p) or per_position not in (c, 2 * c):
        raise CheckpointError(f"{source}: final_layer.linear.weight has {weight.shape[0]} rows; a SiT with patch {p} "
                              f"and {c} channels has {p * p * c} or, with learn_sigma, {2 * p * p * c}")
    # rows are ordered (patch row, patch column, channel); keep channels [0, c) of each position
    out[OUTPUT[0]] = -weight.reshape(p * p, per_position, -1)[:, :c].reshape(p * p * c, -1)
    out[OUTPUT[1]] = -bias.reshape(p * p, per_position)[:, :c].reshape(-1)
    own = net.state_dict()
    for name in own:
        if name.startswith("s_embedder."):
            out[name] = torch.zeros_like(own[name]) if name in GAP_OUT else own[name].clone()
    return out


def sit_network_name(name: str) -> str:
    """'SiT-XL/2' (SiT's spelling) -> 'dit-xl2', the soflow network of the same size."""
    key = str(name).replace("/", "").replace("SiT-", "dit-").replace("sit-", "dit-").lower()
    try:
        return canonical_name(key)
    except Exception:
        raise CheckpointError(f"unknown SiT size {name!r}; soflow has SiT-XL/2, SiT-L/2, SiT-B/2, SiT-B/4 and "
                              "SiT-S/2 (give name=None and the DiT arguments for others)") from None


def load_sit_network(path: str | Path, name: str | None = None, **overrides) -> DiT:
    """A soflow DiT with the weights of a SiT checkpoint, computing F(x, t, t) = -SiT(x, 1 - t, y) (S1).

    `name` is a published size ('SiT-XL/2', ...); without it the shapes in the file fix every
    argument but `num_heads`, which `overrides` must give.  Overrides use soflow's DiT argument
    names (hidden_size, depth, num_heads, ...).  The label table's null row follows the file.
    """
    state = read_sit_state(path)
    inferred = sit_dit_args(state)
    if name is not None:
        net = build(sit_network_name(name), **{"null_class": inferred["null_class"], **overrides})
    elif "num_heads" not in overrides:
        raise CheckpointError(f"{path}: the number of attention heads is not in the file; give name='SiT-XL/2' "
                              "(or another size) or num_heads=")
    else:
        net = DiT(**{**inferred, **overrides})
    return load_into(net, sit_to_soflow(state, net, str(path)), source=str(path))
