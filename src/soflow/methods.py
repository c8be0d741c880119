"""Training methods.  A `Method` says everything the rest of soflow needs to know about one:

- its loss (a dataclass whose fields are the method's config section, and whose instance is the
  training objective),
- how its models are sampled (the sampling modes, the first being the default),
- whether its loss may call the network through DDP's wrapper,
- which paths it supports, and the scalars it logs.

Adding a method is one module in `soflow.objectives` plus one line in `METHODS`.  The config's
sections, the `--mode` choices, the trainer and `Pipeline` all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

from .errors import ConfigError
from .objectives.flow_matching import FlowMatchingLoss
from .objectives.meanflow import MeanFlowLoss, check_meanflow_guidance
from .objectives.shortcut import ShortcutLoss
from .objectives.soflow import SoFlowLoss, check_labels_for_guidance
from .protocols import Objective
from .sampling import ODE_METHODS, Labels, ode_sample, sample
from .solution import SolutionFlow


def _nothing(loss: Objective, step: int) -> dict:
    return {}


@dataclass(frozen=True)
class Method:
    """A training method: its loss, config section, sampling modes and training constraints."""

    name: str
    loss: type  # dataclass: its fields are the config section `section`
    section: str
    modes: tuple[str, ...]  # sampling modes (soflow.sampling.MODES); the first is the default
    # False: the loss must call the bare network (MeanFlow's forward-mode JVP does not run through
    # DDP), so the trainer averages gradients itself and refuses FSDP
    through_ddp: bool = True
    linear_euler_only: bool = False  # the loss's math holds only for the linear path, Euler parameterization
    logged: Callable[[Objective, int], dict] = _nothing  # scalars logged with the metrics at step k
    # further config checks: (section, whether batches have labels, data.name) -> raise ValueError
    check: Callable[[object, bool, str], None] | None = None

    def sample(self, model: SolutionFlow, n: int, nfe: int, *, mode: str | None = None, **kw) -> Tensor:
        """n samples with nfe steps in one of this method's modes (its first when None): a solution
        sampler (`soflow.sample`) or an ODE solver on the velocity (`ode_sample`).  Each step is one
        network evaluation, except Heun's (`soflow.sampling.evaluations`)."""
        mode = self.mode(mode)
        if mode in ODE_METHODS:
            return ode_sample(model, n, nfe, method=mode, **kw)
        return sample(model, n, nfe, mode=mode, **kw)

    def sample_chunks(self, model: SolutionFlow, first: int, last: int, nfe: int, *, labels: Labels = None,
                      batch_size: int = 256, **kw) -> Iterator[Tensor]:
        """`sample` for indices [first, last), one batch at a time (memory stays at one batch).
        labels: None, one class id, or one id per sample of [first, last)."""
        per_sample = labels is not None and torch.as_tensor(labels).dim() > 0
        for start in range(first, last, batch_size):
            stop = min(last, start + batch_size)
            y = torch.as_tensor(labels)[start - first:stop - first] if per_sample else labels
            yield self.sample(model, stop - start, nfe, labels=y, batch_size=batch_size, first_index=start, **kw)

    def mode(self, mode: str | None) -> str:
        if mode is None:
            return self.modes[0]
        if mode not in self.modes:
            raise ConfigError(f"--mode {mode}: method {self.name} samples with {' | '.join(self.modes)}")
        return mode


METHODS: dict[str, Method] = {m.name: m for m in (
    # chain before renoise: on the 2-D validation family chained 2-NFE samples scored 3.18x flow
    # matching at 100 steps against 5.51x for re-noising (docs/benchmarks.md); renoise is the reference's
    Method("soflow", SoFlowLoss, "objective", ("chain", "renoise"), logged=lambda loss, k: {"r": loss.ratio(k)},
           check=check_labels_for_guidance),
    Method("meanflow", MeanFlowLoss, "meanflow", ("chain", "renoise"), through_ddp=False, linear_euler_only=True,
           check=check_meanflow_guidance),
    Method("flow_matching", FlowMatchingLoss, "flow_matching", ("euler", "heun")),
    Method("shortcut", ShortcutLoss, "shortcut", ("chain",)),
)}


def method(name: str) -> Method:
    """The registered method `name` (ConfigError naming the choices if unknown)."""
    if name not in METHODS:
        raise ConfigError(f"unknown training method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]

