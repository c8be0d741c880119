"""What a guidance scale w means at sampling time, for each kind of model.

`--guidance W` (and `Pipeline(..., guidance=W)`, `train.fid_guidance`) is the classifier-free
guidance scale of the velocity field sampled,

    v_w(x, t | y) = v(x, t | null) + w (v(x, t | y) - v(x, t | null)),        (CFG)

so w = 1 is the conditional field and w = 0 the unconditional one.  Models differ in how they
give that field:

- "input":    trained over a range of scales with w as a network input (`guidance_range` of
              SoFlow's objective or of MeanFlow); the network takes w, one forward per step, any
              w in the trained range;
- "trained":  trained with one scale built in (SoFlow's cfg_scale, MeanFlow's omega / (1 - kappa));
              one forward per step, that scale only;
- "sampling": trained without built-in guidance (flow matching, shortcut, or any model at scale 1);
              w != 1 combines a conditional and a null-label forward (CFG), two per step, and needs
              a class-conditional model trained with label dropout.

Leaving the scale out samples at the model's own: its training scale, the configured default of
an "input" model (SoFlow's cfg_scale, MeanFlow's omega / (1 - kappa)), or 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .protocols import Objective

KINDS = ("input", "trained", "sampling")


@dataclass(frozen=True)
class GuidanceScales:
    """The scales a model honours: `default`, and [low, high] for an "input" model."""

    kind: str
    default: float = 1.0
    low: float = 1.0
    high: float = 1.0
    trained_by: str = ""  # the setting that fixes the scale, for the refusal's advice

    def resolve(self, w: float | None) -> float:
        return self.default if w is None else float(w)

    def problem(self, w: float | None) -> str | None:
        """Why a requested scale cannot be honoured (None if it can).  The null-class condition of
        "sampling" models is `cfg_problem`'s, which needs to know the network."""
        if w is None:
            return None
        if not math.isfinite(w):
            return "the scale must be a finite number"
        if self.kind == "input" and not self.low <= w <= self.high:
            return (f"this model takes the scale as an input and was trained on [{self.low:g}, {self.high:g}]; "
                    "choose a value in that range")
        if self.kind == "trained" and w != self.default:
            return (f"this model has guidance {self.default:g} built in by training ({self.trained_by}) and samples "
                    f"at that scale only; leave the scale out or use {self.default:g} (a model trained with "
                    "guidance_range takes the scale at sampling time)")
        return None

    def sampler_scale(self, w: float | None) -> float:
        """The scale handed to soflow.sampling: the network's input ("input"), the CFG scale of two
        forwards ("sampling"), or 1, no further guidance ("trained")."""
        return 1.0 if self.kind == "trained" else self.resolve(w)

    def describe(self) -> dict:
        """The entry of a saved pipeline's config.json."""
        info = {"kind": self.kind, "default": self.default}
        if self.kind == "input":
            info["range"] = [self.low, self.high]
        return info


def cfg_problem(conditional: bool, null_class: bool) -> str | None:
    """Why sampling-time CFG cannot be applied: it needs classes and a trained null class."""
    if not conditional:
        return "the model is unconditional, so there is no class to guide towards; use 1 (no guidance)"
    if not null_class:
        return ("the model was trained without label dropout (cfg_drop_rate 0), so it has no unconditional "
                "(null) class and cannot be guided; use 1 (no guidance)")
    return None


def scales_of(loss: Objective, section: str) -> GuidanceScales:
    """The scales of a model trained with `loss` (a method's config section, named `section`):
    losses with built-in guidance say so through `built_in_guidance()` -> (scale, setting) and a
    `guidance_range` field with `default_guidance()`, the scale sampled by default; the others are
    guided at sampling time."""
    w_range = getattr(loss, "guidance_range", None)
    if w_range is not None:
        return GuidanceScales("input", float(loss.default_guidance()), float(w_range[0]), float(w_range[1]))
    built_in = loss.built_in_guidance() if hasattr(loss, "built_in_guidance") else None
    if built_in is not None and built_in[0] != 1.0:
        return GuidanceScales("trained", built_in[0], built_in[0], built_in[0], f"{section}.{built_in[1]}")
    return GuidanceScales("sampling")
