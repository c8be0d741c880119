"""MeanFlow (Geng et al. 2025) as a baseline on the soflow networks.

MeanFlow learns the average velocity over [r, t] of the probability-flow ODE,

    u(z_t, t, r) = 1 / (t - r) int_r^t v(z_tau, tau) d tau,     z_r = z_t - (t - r) u(z_t, t, r),

which is exactly a SolutionFlow with the Euler parameterization f(z, t, s) = z + (s - t) F(z, t, s),
F = u and s = r, on the linear path z_t = (1 - t) x0 + t x1.  So one-step sampling f(z, 1, 0) =
z - u(z, 1, 0) and k-step sampling along the ODE are `soflow.sample(flow, ..., mode="chain")`.

Differentiating (t - r) u = int_r^t v in t gives the MeanFlow identity u = v - (t - r) du/dt with
the total derivative du/dt = v d_z u + d_t u along the trajectory (dr/dt = 0), and the loss

    loss_i = sg(w_i) ||u(z_t, t, r) - sg(u_tgt)||^2,   u_tgt = v - (t - r) du/dt,
    w_i = 1 / (||u - u_tgt||^2 + c)^p.

du/dt is a Jacobian-vector product of (z, t, r) -> F(z, t, r) along the tangents (v, 1, 0),
computed with `torch.func.jvp`, whose primal output is the forward with grad of those rows.  Rows
with r = t need no derivative: (t - r) du/dt = 0 there, so their target is v itself and they take
a plain forward (the flow-matching rows of MeanFlow).  Each row goes through the network with grad
exactly once; the JVP runs on the r != t rows only (25 % of the batch in the ImageNet recipe).

Training-time guidance (MeanFlow section 4.2 and its appendix): inside the interval
t_min <= t <= t_max, on rows whose label was not dropped,

    v_tilde = omega v + kappa u(z_t, t, t | c) + (1 - omega - kappa) u(z_t, t, t | null),

with both model terms evaluated without grad; elsewhere v_tilde = v.  v_tilde replaces v in the
target and in the JVP tangent.  Its effective guidance scale is w = omega / (1 - kappa).  With
`guidance_range` the network takes w as an input and each row trains at its own w
(`MeanFlowLoss.guided_velocity`, eq. MG).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..nets.dit import math_attention
from ..paths import EulerParameterization, LinearPath, conditional_velocity, expand_as_rows, interpolate
from ..seeding import generator as seeded_generator
from ..solution import SolutionFlow
from ..times import logit_normal
from . import checks
from .scales import call_net, check_labels, check_range, drop_labels, row_scales, with_null

REDUCTIONS = ("sum", "mean")
SPLITS = ("rows", "steps")
STEP_DRAW = 0x4D46  # key of the per-step r != t draw: generator(seed, step, STEP_DRAW)


def _per_row(x: Tensor, reduction: str) -> Tensor:
    x = x.reshape(x.shape[0], -1)
    return x.sum(dim=1) if reduction == "sum" else x.mean(dim=1)


def unwrap_ddp(net: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (torch.func.jvp cannot run through DDP)."""
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


def check_meanflow_flow(flow: SolutionFlow) -> None:
    """MeanFlow's u = (x_t - x_r) / (t - r) identity holds for the linear path with the Euler parameterization only."""
    if not isinstance(flow.param, EulerParameterization) or not isinstance(flow.path, LinearPath):
        raise ValueError("MeanFlow needs the Euler parameterization and the linear path "
                         f"(got parameterization {flow.param.name!r}, path {flow.path.name!r})")


def average_velocity_and_derivative(net: nn.Module, z: Tensor, t: Tensor, r: Tensor, v: Tensor,
                                    labels: Tensor | None = None, augment_labels: Tensor | None = None,
                                    w: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(u, du/dt): u = F(z, t, r) and its total derivative v d_z u + d_t u, in one evaluation.

    A forward-mode JVP of (z, t, r) -> F(z, t, r) along (v, 1, 0); u is its primal output and keeps
    its autograd graph (the forward with grad), du/dt should be detached by the caller.  Attention
    runs on SDPA's math backend, the only one with forward-mode AD.  w, each row's guidance scale
    for a network that takes it, is held fixed (no tangent).
    """
    def u_fn(z_: Tensor, t_: Tensor, r_: Tensor) -> Tensor:
        return call_net(net, z_, t_, r_, labels, augment_labels, w).to(z_.dtype)

    with math_attention():
        return torch.func.jvp(u_fn, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))


def _rows(x: Tensor | None, index: Tensor) -> Tensor | None:
    return None if x is None else x.index_select(0, index)


def average_velocity_where_needed(net: nn.Module, z: Tensor, t: Tensor, r: Tensor, v: Tensor,
                                  labels: Tensor | None = None, augment_labels: Tensor | None = None,
                                  w: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(u, du/dt) like `average_velocity_and_derivative`, with the JVP only on rows where r != t.

    Rows with r = t get u from a plain forward with grad and du/dt = 0: the loss multiplies du/dt
    by t - r, which is exactly 0 there, so the target v - (t - r) du/dt equals v either way.  A
    batch with all rows r != t takes the JVP alone, one with none the plain forward alone.
    """
    moving = r != t
    n_moving = int(moving.sum())
    if n_moving == len(r):
        return average_velocity_and_derivative(net, z, t, r, v, labels, augment_labels, w)
    if n_moving == 0:
        u = call_net(net, z, t, r, labels, augment_labels, w).to(z.dtype)
        return u, torch.zeros_like(u)
    jvp_rows = moving.nonzero().squeeze(1)
    plain_rows = (~moving).nonzero().squeeze(1)
    u_jvp, dudt_jvp = average_velocity_and_derivative(
        net, z[jvp_rows], t[jvp_rows], r[jvp_rows], v[jvp_rows],
        _rows(labels, jvp_rows), _rows(augment_labels, jvp_rows), _rows(w, jvp_rows))
    u_plain = call_net(net, z[plain_rows], t[plain_rows], r[plain_rows], _rows(labels, plain_rows),
                       _rows(augment_labels, plain_rows), _rows(w, plain_rows)).to(z.dtype)
    # back to the batch order: row jvp_rows[i] is u_jvp[i], row plain_rows[j] is u_plain[j]
    back = torch.cat([jvp_rows, plain_rows]).argsort()
    u = torch.cat([u_jvp, u_plain]).index_select(0, back)
    dudt = torch.cat([dudt_jvp, torch.zeros_like(u_plain)]).index_select(0, back)
    return u, dudt


@dataclass
class MeanFlowLoss:
    """Callable loss: `loss, stats = MeanFlowLoss(...)(flow, x0, labels, step)`.

    p, c:             adaptive weight 1 / (||u - u_tgt||^2 + c)^p.  The paper writes c > 0 small,
                      e.g. 1e-3, and uses p = 1 on ImageNet; c = 0.01 behaves the same in practice
                      since ||.||^2 is summed over thousands of dimensions.  p = 0 gives the plain
                      squared error.
    reduction:        "sum" (MeanFlow: squared L2 norm per sample) or "mean" over the dimensions
    time_mean, time_std: logit-normal (mean, std) of the two times; t = max, r = min
    ratio_r_neq_t:    share of r != t, counted as r_neq_t_split says (MeanFlow's ImageNet setting:
                      25 % of rows)
    r_neq_t_split:    "rows": the first int(ratio_r_neq_t B) rows of every batch keep r < t, the
                      others get r = t.  "steps": on a share ratio_r_neq_t of the training steps the
                      whole batch keeps r < t, on the others every row gets r = t (the public
                      rectified-flow-pytorch MeanFlow, 0.5).  Which steps is a function of
                      (seed, step) alone, the same on every rank, micro-batch and resume.
    omega, kappa:     training-time guidance scale and mix; omega = 1, kappa = 0 is no guidance.
                      The effective CFG scale is w = omega / (1 - kappa).
    guidance_range [w_lo, w_hi] (off: null): the network takes w as an input and each row draws
                      its own w from guidance_distribution (uniform | log-uniform) on the range,
                      keeping kappa (0 <= kappa < 1) and training at omega = w (1 - kappa);
                      omega / (1 - kappa) of the configured omega is then the scale sampled by
                      default and must lie in the range.  Label-dropped rows train at w = 1.
    t_min, t_max:     guidance applies where t_min <= t <= t_max
    cfg_drop_rate:    share of labels replaced by the null class (num_classes)
    seed:             train.seed in a run config (not a key of its own): picks the r != t steps

    One step sends each row through the network with grad exactly once: the rows with r != t as
    the primal of the JVP, the rows with r = t (which need no derivative) as a plain forward.  With
    guidance on it adds one forward without grad (conditional and unconditional rows batched
    together); so does guidance_range, whose network takes each row's w in every forward.

    `net` may be the caller's wrapper of flow.net.  A DistributedDataParallel wrapper is unwrapped
    (forward-mode AD does not run through DDP), so gradients are not synchronized by DDP: the
    training loop does not wrap MeanFlow runs in DDP and averages gradients itself
    (`soflow.train.parallel.average_gradients`; tested with two torchrun ranks).  Other wrappers
    are called as given (a torch.compile'd MLP works under torch.func.jvp on CPU).
    """

    p: float = 1.0
    c: float = 1e-3
    reduction: str = "sum"
    time_mean: float = -0.4
    time_std: float = 1.0
    ratio_r_neq_t: float = 0.25
    r_neq_t_split: str = "rows"
    omega: float = 1.0
    kappa: float = 0.0
    guidance_range: tuple | None = None
    guidance_distribution: str = "uniform"
    t_min: float = 0.0
    t_max: float = 1.0
    cfg_drop_rate: float = 0.0
    # in a run config it is train.seed, not a key of its own
    seed: int = field(default=0, metadata={"from": "train.seed"})

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction: unknown reduction {self.reduction!r}; choose one of {', '.join(REDUCTIONS)}")
        if self.r_neq_t_split not in SPLITS:
            raise ValueError(f"r_neq_t_split: unknown split {self.r_neq_t_split!r}; choose one of {', '.join(SPLITS)}")
        checks.non_negative("p", self.p)
        checks.positive("c", self.c)  # the weight 1 / (||.||^2 + c)^p stays finite only for c > 0
        checks.number("time_mean", self.time_mean)
        checks.positive("time_std", self.time_std)
        checks.in_unit_interval("ratio_r_neq_t", self.ratio_r_neq_t)
        checks.in_unit_interval("cfg_drop_rate", self.cfg_drop_rate)
        for name in ("omega", "kappa", "t_min", "t_max"):
            checks.number(name, getattr(self, name))
        if self.t_min > self.t_max:
            raise ValueError(f"t_min: the guidance interval is empty: t_min {self.t_min} > t_max {self.t_max}")
        if self.guidance_range is not None and not 0 <= self.kappa < 1:
            raise ValueError(f"kappa: with guidance_range each row trains at omega = w (1 - kappa), which needs "
                             f"0 <= kappa < 1, got {self.kappa}")
        check_range(self.guidance_range, self.guidance_distribution, self.default_guidance(), "omega",
                    "omega / (1 - kappa) is", "set omega and kappa")

    @property
    def guided(self) -> bool:
        return self.omega != 1.0 or self.kappa != 0.0 or self.guidance_range is not None

    def default_guidance(self) -> float:
        """The scale sampled by default: omega / (1 - kappa) of the configured omega and kappa."""
        return self.omega / (1 - self.kappa) if self.kappa != 1 else math.inf

    def row_scales(self, n: int, cfg_mask: Tensor | None, device: torch.device | None) -> Tensor | None:
        """Each row's guidance scale (None unless guidance_range is set); dropped labels get w = 1."""
        return row_scales(self.guidance_range, self.guidance_distribution, n, cfg_mask, device)

    def built_in_guidance(self) -> tuple[float, str] | None:
        """(effective CFG scale omega / (1 - kappa), settings) of a guided model (MeanFlow, appendix:
        v_tilde = omega v + kappa u_c + (1 - omega - kappa) u_null has the fixed point
        u_c = u_null + omega / (1 - kappa) (v_c - u_null)); None without training-time guidance."""
        if self.omega == 1.0 and self.kappa == 0.0:
            return None
        return self.default_guidance(), f"omega={self.omega:g}, kappa={self.kappa:g}"

    def moving_step(self, step: int) -> bool:
        """With r_neq_t_split "steps": whether training step `step` keeps r < t on the whole batch,
        true on a share ratio_r_neq_t of the steps, drawn from (seed, step) alone."""
        draw = torch.rand((), generator=seeded_generator(self.seed, step, STEP_DRAW), dtype=torch.float64)
        return bool(draw < self.ratio_r_neq_t)

    def rows_keeping_r(self, n: int, step: int) -> int:
        """How many rows (the first ones) keep r < t at training step `step`; the rest get r = t."""
        if self.r_neq_t_split == "rows":
            return int(self.ratio_r_neq_t * n)
        return n if self.moving_step(step) else 0

    def sample_times(self, n: int, device: torch.device | None = None, generator: torch.Generator | None = None,
                     step: int = 0) -> tuple[Tensor, Tensor]:
        """(t, r): the max and min of two logit-normal draws; rows from `rows_keeping_r` on get r = t."""
        a = logit_normal(n, self.time_mean, self.time_std, device=device, generator=generator)
        b = logit_normal(n, self.time_mean, self.time_std, device=device, generator=generator)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        keep = torch.arange(n, device=t.device) < self.rows_keeping_r(n, step)
        return t, torch.where(keep, r, t)

    def __call__(self, flow: SolutionFlow, x0: Tensor, labels: Tensor | None = None, step: int = 0,
                 augment_labels: Tensor | None = None, net: nn.Module | None = None) -> tuple[Tensor, dict]:
        b, dev = x0.shape[0], x0.device
        x1 = torch.randn_like(x0)
        _, cfg_mask = drop_labels(labels, self.cfg_drop_rate, flow.num_classes, dev)  # loss_on drops them
        w = self.row_scales(b, cfg_mask, dev)
        t, r = self.sample_times(b, device=dev, step=step)
        return self.loss_on(flow, x0, x1, t.to(x0.dtype), r.to(x0.dtype), labels, cfg_mask, augment_labels, net, w)

    def loss_on(self, flow: SolutionFlow, x0: Tensor, x1: Tensor, t: Tensor, r: Tensor,
                labels: Tensor | None = None, cfg_mask: Tensor | None = None,
                augment_labels: Tensor | None = None, net: nn.Module | None = None,
                w: Tensor | None = None) -> tuple[Tensor, dict]:
        """The loss for given data x0, noise x1, times t >= r [B], true labels and drop mask, and with
        guidance_range each row's guidance scale w [B] (rows whose label is dropped train at 1)."""
        check_meanflow_flow(flow)
        if (w is None) != (self.guidance_range is None):
            raise ValueError("w: pass each row's guidance scale exactly when guidance_range is set "
                             f"(guidance_range {self.guidance_range}, w {'missing' if w is None else 'given'})")
        if w is not None and cfg_mask is not None:
            w = torch.where(cfg_mask, torch.ones_like(w), w)
        net = unwrap_ddp(flow.net if net is None else net)
        z = interpolate(flow.path, x0, x1, t)
        v = conditional_velocity(flow.path, x0, x1, t)
        dropped = labels
        if labels is not None and cfg_mask is not None:
            dropped = with_null(labels, cfg_mask, flow.num_classes)
        if self.guided:
            with torch.no_grad():
                v = self.guided_velocity(flow, net, z, t, v, labels, cfg_mask, augment_labels, w)

        u, dudt = average_velocity_where_needed(net, z, t, r, v, dropped, augment_labels, w)
        u_tgt = (v - expand_as_rows(t - r, v) * dudt).detach()
        err = (u - u_tgt) ** 2
        sq = _per_row(err, self.reduction)
        weight = 1 / (sq.detach() + self.c) ** self.p
        stats = {"meanflow_mse": err.detach().mean(), "meanflow_weight": weight.mean()}
        return (weight * sq).mean(), stats

    def guided_velocity(self, flow: SolutionFlow, net: nn.Module, z: Tensor, t: Tensor, v: Tensor,
                        labels: Tensor | None, cfg_mask: Tensor | None = None,
                        augment_labels: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        """v_tilde = omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | null) where
        t_min <= t <= t_max and the label was kept; v elsewhere.  Call without grad.

        With guidance_range (w [B], each row's scale, 1 on label-dropped rows) a row trains at
        omega = w (1 - kappa):

            v_tilde = w (1 - kappa) v + kappa u(z, t, t | c, w) + (1 - w (1 - kappa) - kappa) u(z, t, t | null, 1)
                    = (1 - kappa) (u_null + w (v - u_null)) + kappa u_c,                       (MG)

        u_c = u(z, t, t | c, w) and u_null = u(z, t, t | null, 1), inside [t_min, t_max] on kept rows;
        elsewhere the target is v as above, and the network still takes the row's w.

        Why these velocities.  The field to learn at scale w is the CFG field

            v_w(z, t | c) = v(z, t | null) + w (v(z, t | c) - v(z, t | null)).

        E[v | z_t, c] = v(z_t, t | c) and v enters (MG) linearly, so at the fixed point
        u_c = E[v_tilde] = (1 - kappa) (u_null + w (v(z, t | c) - u_null)) + kappa u_c, that is
        u_c = u_null + w (v(z, t | c) - u_null) = v_w when u_null is the null field.  The null field
        is the same at every scale (CFG of the null class towards itself), so it is queried at
        w = 1, the scale the label-dropped rows train at (their target v is a sample of
        v(z, t | null)).  The kappa term must be the model's own velocity at the row's w, as is the
        JVP forward: at another scale the fixed point would mix two scales' fields.  v_tilde is
        then the tangent of the w-model's JVP and its average velocity u(z, t, r | c, w) follows
        the ODE of v_w.  With w = omega / (1 - kappa) this is the fixed-scale target above.
        """
        if labels is None:
            what = "guidance_range" if w is not None else "omega / kappa guidance"
            raise ValueError(f"{what} needs class labels; use omega=1, kappa=0 and guidance_range=null for "
                             "unconditional data")
        omega = self.omega if w is None else expand_as_rows(w.to(v.dtype), v) * (1 - self.kappa)
        w_uncond = 1.0 - omega - self.kappa
        null = torch.full_like(labels, flow.num_classes)
        xs, ys, ws, coefs = [], [], [], []
        if self.kappa != 0.0:  # the conditional model, at the row's own w
            xs.append(z); ys.append(labels); ws.append(w); coefs.append(self.kappa)
        if w is not None or w_uncond != 0.0:  # the null field, at w = 1
            xs.append(z); ys.append(null); ws.append(None if w is None else torch.ones_like(w))
            coefs.append(w_uncond)
        v_tilde = omega * v
        if xs:
            n = len(xs)
            tt = t.repeat(n)
            aug = None if augment_labels is None else augment_labels.repeat(n, *([1] * (augment_labels.dim() - 1)))
            scales = None if w is None else torch.cat(ws)
            u = call_net(net, torch.cat(xs), tt, tt, torch.cat(ys), aug, scales).to(v.dtype).chunk(n)
            for coef, u_i in zip(coefs, u):
                v_tilde = v_tilde + coef * u_i
        inside = (t >= self.t_min) & (t <= self.t_max)
        if cfg_mask is not None:
            inside = inside & ~cfg_mask
        return torch.where(expand_as_rows(inside, v), v_tilde, v)


def check_meanflow_guidance(loss: MeanFlowLoss, has_labels: bool, data_name: str, key: str = "meanflow.") -> None:
    """guidance_range needs class labels and label dropout (the null-label velocity of eq. MG); the
    fixed-scale settings keep their own behaviour."""
    if loss.guidance_range is not None:
        check_labels(loss, has_labels, data_name, key)
