"""One- and few-step sampling with a trained SolutionFlow.

Grid t_i = 1 - i / N, i = 0..N.  Two k-step modes:

- "chain" (the default): x = f(x, t_i, t_{i+1}), following one ODE trajectory.
- "renoise" (the reference's rule): x0_hat = f(x, t_i, 0), then x = alpha(t_{i+1}) x0_hat + beta(t_{i+1}) eps
  with fresh noise eps; the last step returns f(x, t_{N-1}, 0).

Both give x = f(x1, 1, 0) at one step.  `ode_sample` instead integrates the model velocity
v(x, t) with Euler or Heun steps (flow-matching baselines).  Every random number of sample i
comes from its own generator seeded by (seed, i), so a sample does not depend on the batch it
was drawn in.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError
from .guidance import cfg_problem
from .nets.dit import GUIDANCE_EMBEDDER
from .paths import expand_as_rows
from .seeding import generator
from .solution import SolutionFlow

# chain first, the default: on the 2-D validation family chained 2-step samples scored 3.18x flow
# matching at 100 steps against 5.51x for re-noising (docs/benchmarks.md)
SOLUTION_MODES = ("chain", "renoise")
ODE_METHODS = ("euler", "heun")
MODES = SOLUTION_MODES + ODE_METHODS

# what `labels` may be: None (random classes of a class-conditional model), one class id for every
# sample, or one id per sample (a tensor, array or sequence); `device`: where the samples are drawn
# (None: the model's device)
Labels = int | Sequence[int] | np.ndarray | Tensor | None
Device = str | torch.device | None


def draw_inputs(shape: tuple, draws: int, num_classes: int, seed: int,
                indices: Iterable[int]) -> tuple[Tensor, Tensor | None]:
    """Noise [n, draws, *shape] and (for class-conditional models) a random label per sample, all
    from the sample's own generator: renoise sampling draws nfe noises, chain and ODE sampling one."""
    noise, labels = [], []
    for i in indices:
        g = generator(seed, int(i))
        if num_classes:
            labels.append(torch.randint(num_classes, (), generator=g))
        noise.append(torch.randn(draws, *shape, generator=g))
    return torch.stack(noise), (torch.stack(labels) if num_classes else None)


def takes_guidance(net: torch.nn.Module) -> bool:
    """Whether the network takes the guidance scale w as an input (trained with guidance_range)."""
    return getattr(net, GUIDANCE_EMBEDDER, None) is not None


def _network(model: SolutionFlow, x: Tensor, t: Tensor, s: Tensor, labels, guidance: float) -> Tensor:
    """F(x, t, s): with w as the network's input (one forward), or for other networks with guidance
    F_uncond + w (F_cond - F_uncond) from one forward on a doubled batch.  f and v are affine in F,
    so this guides the solution and the velocity alike."""
    if takes_guidance(model.net):
        return model.net(x, t, s, labels, guidance=torch.full_like(t, guidance)).to(x.dtype)
    if guidance == 1.0 or labels is None:
        return model.net(x, t, s, labels).to(x.dtype)
    null = torch.full_like(labels, model.num_classes)
    cond, uncond = model.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([s, s]),
                             torch.cat([labels, null])).to(x.dtype).chunk(2)
    return uncond + guidance * (cond - uncond)


def has_null_class(net: torch.nn.Module) -> bool:
    """Whether the network has an input for "no class", the unconditional F of guidance.  The DiT and
    the MLP get an extra row in their class table only when trained with label dropout
    (cfg_drop_rate > 0); the U-Net's null class is the all-zero class vector, always present."""
    table = getattr(getattr(net, "y_embedder", None), "embedding_table", None)  # DiT
    if table is None:
        table = getattr(net, "label", None)  # MLP
    if isinstance(table, torch.nn.Embedding):
        return table.num_embeddings > net.num_classes
    return True


def guidance_problem(model: SolutionFlow, guidance: float, trained_with_dropout: bool | None = None) -> str | None:
    """Why `model` cannot be sampled with this guidance scale, or None.  `trained_with_dropout`, when
    the run's config is known, also catches a null class that exists but was never trained (U-Net)."""
    if not math.isfinite(guidance):
        return "the scale must be a finite number"
    if guidance == 1.0 or takes_guidance(model.net):  # the latter: w is an input, no null class needed
        return None
    return cfg_problem(bool(model.num_classes), trained_with_dropout is not False and has_null_class(model.net))


def _check_guidance(model: SolutionFlow, guidance: float) -> None:
    problem = guidance_problem(model, guidance)
    if problem:
        raise ConfigError(f"guidance {guidance}: {problem}")


def _times(x: Tensor, t: float) -> Tensor:
    """One time per row, in the sample's dtype (as SolutionFlow.forward builds them), so that the
    solution and velocity samplers feed the network alike and float64 sampling stays float64."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)


def _solution(model: SolutionFlow, x: Tensor, t: float, s: float, labels, guidance: float) -> Tensor:
    tt, ss = _times(x, t), _times(x, s)
    return model.solution_from(x, tt, ss, _network(model, x, tt, ss, labels, guidance))


def _in_batches(model: SolutionFlow, n: int, draws: int, seed: int, labels, batch_size: int, first_index: int,
                device, run) -> Tensor:
    """Per-sample noise [b, draws, ...] and labels, batch by batch, through run(noise, labels)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    labels = _requested_labels(labels, n, model.num_classes)
    shape, dtype = tuple(model.net.sample_shape), next(model.parameters()).dtype
    out = []
    with eval_mode(model):
        for start in range(0, n, batch_size):
            idx = range(first_index + start, first_index + min(n, start + batch_size))
            noise, drawn = draw_inputs(shape, draws, model.num_classes, seed, idx)
            y = drawn if labels is None else labels[start:start + len(idx)]
            out.append(run(noise.to(device, dtype), None if y is None else y.to(device)))
    return torch.cat(out)


@torch.no_grad()
def run_sampler(model: SolutionFlow, noise: Tensor, nfe: int, labels: Tensor | None, mode: str,
                guidance: float) -> Tensor:
    """The solution sampler on one batch of per-sample noise [b, draws, ...]: `nfe` steps in `mode`."""
    grid = [1 - i / nfe for i in range(nfe + 1)]
    x = noise[:, 0]
    for i in range(nfe):
        if mode == "chain":
            x = _solution(model, x, grid[i], grid[i + 1], labels, guidance)
            continue
        x0_hat = _solution(model, x, grid[i], 0.0, labels, guidance)
        if i == nfe - 1:
            return x0_hat
        t_next = _times(x, grid[i + 1])
        x = expand_as_rows(model.path.alpha(t_next), x0_hat) * x0_hat + \
            expand_as_rows(model.path.beta(t_next), x0_hat) * noise[:, i + 1]
    return x


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Context manager: `module` in eval mode inside, its former mode restored after."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


def _requested_labels(labels, n: int, num_classes: int) -> Tensor | None:
    """None, or the requested class ids as a long tensor [n] (validated)."""
    if labels is None:
        return None
    if not num_classes:
        raise ConfigError("labels given to an unconditional model")
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.dim() > 1 or labels.numel() not in (1, n):
        raise ConfigError(f"labels: expected one class id or {n} (one per sample), got {labels.numel()}")
    labels = labels.reshape(-1).expand(n).clone()
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ConfigError(f"labels must be class ids in [0, {num_classes - 1}]")
    return labels


def sample(model: SolutionFlow, n: int, nfe: int = 1, *, seed: int = 0, labels: Labels = None, mode: str = "chain",
           guidance: float = 1.0, batch_size: int = 256, first_index: int = 0, device: Device = None) -> Tensor:
    """Draw n samples with `nfe` solution steps in `mode` ("chain" or "renoise", see the module
    docstring), one network evaluation each (a doubled batch with guidance != 1, unless the
    network takes the guidance scale as an input: then w goes into every forward).

    labels: None (random classes for a class-conditional model), an int, or a tensor [n].
    Sample i uses the generator seeded by (seed, first_index + i): a range of indices can be
    drawn on another process or in other batch sizes and gives the same samples.
    """
    if nfe < 1:
        raise ConfigError(f"nfe must be >= 1, got {nfe}")
    if mode not in SOLUTION_MODES:
        raise ConfigError(f"unknown sampling mode {mode!r}; choose one of {', '.join(SOLUTION_MODES)}")
    _check_guidance(model, guidance)
    draws = nfe if mode == "renoise" else 1
    return _in_batches(model, n, draws, seed, labels, batch_size, first_index, device,
                       lambda noise, y: run_sampler(model, noise, nfe, y, mode, guidance))



def _velocity(model: SolutionFlow, x: Tensor, t: float, labels, guidance: float) -> Tensor:
    """v(x, t), guided as in `_network`."""
    tt = _times(x, t)
    return model.velocity_from(x, tt, _network(model, x, tt, tt, labels, guidance))


@torch.no_grad()
def run_ode(model: SolutionFlow, x: Tensor, steps: int, labels: Tensor | None, method: str,
            guidance: float) -> Tensor:
    """Integrate dx/dt = v(x, t) from t = 1 to 0 on t_i = 1 - i / steps.

    Heun (EDM's second-order step): x' = x + h v(x, t_i), x <- x + h (v(x, t_i) + v(x', t_{i+1})) / 2,
    h = t_{i+1} - t_i; the last step, which ends at t = 0, is a plain Euler step.
    """
    grid = [1 - i / steps for i in range(steps + 1)]
    for i in range(steps):
        h = grid[i + 1] - grid[i]
        d = _velocity(model, x, grid[i], labels, guidance)
        x_next = x + h * d
        if method == "heun" and i < steps - 1:
            d_next = _velocity(model, x_next, grid[i + 1], labels, guidance)
            x_next = x + h * 0.5 * (d + d_next)
        x = x_next
    return x


def ode_sample(model: SolutionFlow, n: int, steps: int, *, method: str = "euler", seed: int = 0, labels: Labels = None,
               guidance: float = 1.0, batch_size: int = 256, first_index: int = 0, device: Device = None) -> Tensor:
    """Draw n samples by integrating the model velocity from t = 1 (noise) to t = 0 in `steps` steps.

    method: "euler" (NFE = steps) or "heun" (NFE = 2 steps - 1: the last step is Euler).  With
    guidance != 1 each evaluation is one forward on a doubled batch (conditional + null labels).
    labels, seed, first_index, batch_size: as in `sample`; sample i starts from the same noise (and
    random class) as `sample(..., mode="chain")` with the same (seed, first_index + i).
    """
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if method not in ODE_METHODS:
        raise ConfigError(f"unknown ODE method {method!r}; choose one of {', '.join(ODE_METHODS)}")
    _check_guidance(model, guidance)
    return _in_batches(model, n, 1, seed, labels, batch_size, first_index, device,
                       lambda noise, y: run_ode(model, noise[:, 0], steps, y, method, guidance))


def evaluations(nfe: int, mode: str) -> int:
    """Network evaluations per sample of `nfe` steps in `mode` (one forward of a guided batch counts
    once): `nfe` itself, except Heun's method, which spends two on each step but the last."""
    return 2 * nfe - 1 if mode == "heun" else nfe

