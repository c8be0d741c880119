"""The SoFlow objective: flow-matching loss + solution-consistency loss, with training-time guidance.

One training step makes exactly one network forward with grad (flow-matching rows and
consistency rows together) plus the forwards the method needs without grad: the guidance
velocities, when guidance is on, and the consistency target.  Nothing in it synchronizes with
the host.  Statistics come back as detached tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..data import traits
from ..paths import conditional_velocity, expand_as_rows, interpolate, mean_per_row
from ..solution import SolutionFlow
from ..times import SCHEDULES, consistency_times, guidance_decay, logit_normal, middle_ratio
from . import checks
from .scales import call_net, check_labels, check_range, drop_labels, row_scales


@dataclass
class Rows:
    """One group of training rows: data x0, noise x1, times (s = t for flow matching)."""

    x0: Tensor
    x1: Tensor
    t: Tensor
    s: Tensor
    l: Tensor | None = None  # middle time of the consistency target
    labels: Tensor | None = None  # already label-dropped (null id where cfg_mask)
    cfg_mask: Tensor | None = None  # True where the label was dropped
    augment_labels: Tensor | None = None
    w: Tensor | None = None  # guidance scale of each row, when the network takes it as input

    def __len__(self) -> int:
        return self.x0.shape[0]


def _cat(*parts):
    parts = [p for p in parts if p is not None]
    return torch.cat(parts) if parts else None


def has_active_dropout(net: nn.Module) -> bool:
    """Whether `net` is in training mode with some dropout probability above 0."""
    return net.training and any(
        (isinstance(m, nn.Dropout) and m.p > 0) or (isinstance(getattr(m, "dropout", None), float) and m.dropout > 0)
        for m in net.modules())


class _RngCheckpoint:
    """Saves the generator state that dropout draws from, so a second forward repeats the masks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()

    def restore(self):
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(self.state, self.device)
        else:
            torch.set_rng_state(self.state)


@dataclass
class SoFlowLoss:
    """Callable loss: `loss, stats = SoFlowLoss(...)(flow, x0, labels, step)`.

    p, eps:               adaptive weight 1 / (mse + eps)^p of both losses
    velocity_loss_ratio:  share of each batch given to the flow-matching loss (the first rows)
    time_mean, time_std:  logit-normal (mean, std) of [flow-matching t, consistency s, consistency t]
    cfg_scale (w), mix_ratio (m), cfg_drop_rate, cfg_decay_time (tau): training-time guidance
    guidance_range [w_lo, w_hi] (off: null): the network takes w as an input and each row draws
        its own w from guidance_distribution (uniform | log-uniform) on the range; cfg_scale is
        then the scale sampled by default.  Label-dropped rows train at w = 1.
    guidance_interval [t_lo, t_hi]: guidance only for t in it (the target is v elsewhere)
    schedule, r_init, r_end, total_steps: r(k, K) placing the middle time l = t + (s - t) r
    """

    p: float = 1.0
    eps: float = 0.01
    velocity_loss_ratio: float = 0.75
    time_mean: tuple = (-0.2, -1.0, 0.2)
    time_std: tuple = (1.0, 0.8, 0.8)
    cfg_scale: float = 1.0
    mix_ratio: float = 1.0
    cfg_drop_rate: float = 0.0
    cfg_decay_time: float = 1.0
    guidance_range: tuple | None = None
    guidance_distribution: str = "uniform"
    guidance_interval: tuple = (0.0, 1.0)
    schedule: str = "exponent"
    r_init: float = 0.1
    r_end: float = 0.002
    # K of r(k, K); in a run config it is train.total_steps, not a key of its own
    total_steps: int = field(default=400_000, metadata={"from": "train.total_steps"})

    def __post_init__(self):
        checks.non_negative("p", self.p)
        checks.positive("eps", self.eps)  # the weight 1 / (mse + eps)^p stays finite only for eps > 0
        for name in ("velocity_loss_ratio", "cfg_drop_rate", "mix_ratio"):
            checks.in_unit_interval(name, getattr(self, name))
        checks.number("cfg_scale", self.cfg_scale)
        checks.number("cfg_decay_time", self.cfg_decay_time)
        what = "flow-matching t, consistency s, consistency t"
        self.time_mean = checks.numbers("time_mean", self.time_mean, 3, what)
        self.time_std = checks.numbers("time_std", self.time_std, 3, what)
        if not all(x > 0 for x in self.time_std):
            raise ValueError(f"time_std: the logit-normal spreads must be positive, got {list(self.time_std)}")
        self._check_middle_ratio()
        self._check_guidance_input()

    def _check_guidance_input(self) -> None:
        """guidance_interval inside [0, 1]; a guidance_range [w_lo, w_hi] with 1 <= w_lo < w_hi that
        holds cfg_scale, the scale sampled by default."""
        lo, hi = checks.numbers("guidance_interval", self.guidance_interval, 2, "t_lo, t_hi")
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"guidance_interval: expected 0 <= t_lo <= t_hi <= 1, got {[lo, hi]}")
        check_range(self.guidance_range, self.guidance_distribution, self.cfg_scale, "cfg_scale", "it is",
                    "set cfg_scale")

    def _check_middle_ratio(self) -> None:
        """r(k, K) places the middle time l = t + (s - t) r between s (r = 1) and t (r = 0), so every
        schedule needs r_init and r_end in [0, 1]; the exponent schedule r_init (r_end / r_init)^(k / K)
        also divides by r_init and takes powers of the ratio, so both must be above 0."""
        if str(self.schedule).lower() not in SCHEDULES:
            raise ValueError(f"schedule: unknown middle-time schedule {self.schedule!r}; choose one of "
                             f"{', '.join(SCHEDULES)}")
        for name in ("r_init", "r_end"):
            value = getattr(self, name)
            checks.in_unit_interval(name, value, " (the middle time sits between s and t)")
            if str(self.schedule).lower() == "exponent" and value == 0:
                raise ValueError(f"{name}: the exponent schedule needs r_init and r_end above 0, got 0; "
                                 "use a small positive value or schedule=linear")

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0 or self.mix_ratio != 1.0 or self.guidance_range is not None

    def default_guidance(self) -> float:
        return self.cfg_scale

    def built_in_guidance(self) -> tuple[float, str]:
        return self.cfg_scale, "cfg_scale"

    def row_scales(self, n: int, cfg_mask: Tensor | None, device: torch.device | None) -> Tensor | None:
        """Each row's guidance scale (None unless guidance_range is set); dropped labels get w = 1."""
        return row_scales(self.guidance_range, self.guidance_distribution, n, cfg_mask, device)

    def ratio(self, step: int) -> float:
        """r(k, K) at training step k."""
        return middle_ratio(self.schedule, step, self.total_steps, self.r_init, self.r_end)

    def __call__(self, flow: SolutionFlow, x0: Tensor, labels: Tensor | None = None, step: int = 0,
                 augment_labels: Tensor | None = None, net: nn.Module | None = None) -> tuple[Tensor, dict]:
        """Total loss (n_v / B) L_FM + (n_c / B) L_cons on a batch; `net` may be a DDP/compiled wrapper."""
        b, dev = x0.shape[0], x0.device
        n_v = int(self.velocity_loss_ratio * b)
        x1 = torch.randn_like(x0)
        labels, cfg_mask = drop_labels(labels, self.cfg_drop_rate, flow.num_classes, dev)
        r = self.ratio(step)
        w = self.row_scales(b, cfg_mask, dev)
        t_v = logit_normal(n_v, self.time_mean[0], self.time_std[0], device=dev)
        t_c, s_c, l_c = consistency_times(b - n_v, self.time_mean[1], self.time_std[1],
                                          self.time_mean[2], self.time_std[2], r, device=dev)
        rows = lambda sl, **kw: Rows(x0[sl], x1[sl], labels=None if labels is None else labels[sl],
                                     cfg_mask=None if cfg_mask is None else cfg_mask[sl],
                                     augment_labels=None if augment_labels is None else augment_labels[sl],
                                     w=None if w is None else w[sl], **kw)
        fm = rows(slice(0, n_v), t=t_v, s=t_v)
        cons = rows(slice(n_v, b), t=t_c, s=s_c, l=l_c)
        velocity_loss, consistency_loss, stats = self.losses(flow, fm, cons, net)
        return (n_v / b) * velocity_loss + ((b - n_v) / b) * consistency_loss, stats

    def losses(self, flow: SolutionFlow, fm: Rows, cons: Rows,
               net: nn.Module | None = None) -> tuple[Tensor, Tensor, dict]:
        """L_FM on the rows `fm` and L_cons on the rows `cons` (either may be empty).

        `net` (default flow.net) is what gets called: a DDP, FSDP or compiled wrapper of flow.net.
        """
        net = flow.net if net is None else net
        n_v = len(fm)
        groups = [g for g in (fm, cons) if len(g)]
        x_t = [interpolate(flow.path, g.x0, g.x1, g.t) for g in groups]
        v_t = [conditional_velocity(flow.path, g.x0, g.x1, g.t) for g in groups]

        # The one forward with grad: F(x_t, t, t) on FM rows and F(x_t, t, s) on consistency rows.
        # Dropout masks of this forward are replayed by the consistency target (same RNG state).
        rng = _RngCheckpoint(fm.x0.device) if has_active_dropout(flow.net) else None
        args = (torch.cat(x_t), _cat(*(g.t for g in groups)), _cat(*(g.s for g in groups)),
                _cat(*(g.labels for g in groups)), _cat(*(g.augment_labels for g in groups)),
                _cat(*(g.w for g in groups)))
        out = call_net(net, *args).to(fm.x0.dtype)
        v_pred = flow.velocity_from(x_t[0], fm.t, out[:n_v]) if n_v else None

        with torch.no_grad():
            targets = self._guided_velocities(flow, net, fm, cons, x_t, v_t, v_pred)
        stats = {}
        velocity_loss = consistency_loss = out.new_zeros(())
        if n_v:
            velocity_loss = self._velocity_loss(flow, fm, v_pred, targets[0], stats)
        if len(cons):
            consistency_loss = self._consistency_loss(flow, net, cons, x_t[-1], out[n_v:], targets[-1],
                                                      rng, args if n_v else None, stats)
        return velocity_loss, consistency_loss, stats

    def _guided_velocities(self, flow, net, fm: Rows, cons: Rows, x_t, v_t, v_pred) -> list[Tensor]:
        """Target velocities with training-time guidance (no grad), for a row (x_t, t, y, w):

            v_g = v + g(t) (w - 1) (v - v_uncond),    v_mix = m v_g + (1 - m) v_cond,         (G)

        v = x1 - x0 the path velocity, v_uncond = u(x_t, t | null, 1) and v_cond = u(x_t, t | y, w)
        model velocities; label-dropped rows keep v.  w is cfg_scale, or the row's own scale when the
        network takes it (guidance_range); g(t) is the decay, times 1[t_lo <= t <= t_hi].

        Why these velocities.  The field to learn at scale w is the CFG field

            v_w(x, t | y) = v(x, t | null) + w (v(x, t | y) - v(x, t | null))
                          = v(x, t | y) + (w - 1) (v(x, t | y) - v(x, t | null)).

        E[v | x_t, y] = v(x_t, t | y), and v enters (G) linearly, so E[v_g | x_t, y] = v_w (g = 1):
        the conditional field needs no model query.  The unconditional one is not a sample of the
        row's path, so the model gives it: its null-label velocity.  The null field is the same at
        every scale (CFG of the null class towards itself), so it is queried at w = 1, the scale
        the label-dropped rows train at (their target v is a sample of v(x, t | null)).  The mix
        term must be the model's velocity at the row's own w: at the fixed point u_w = E[v_mix]
        = m v_w + (1 - m) u_w, so u_w = v_w; at another scale it would blend two scales' fields.
        On flow-matching rows v_cond is the prediction itself (same x_t, t, y, w).
        """
        groups = [g for g in (fm, cons) if len(g)]
        if groups[0].labels is None or not self.guided:
            if self.guided:
                raise ValueError("cfg_scale / mix_ratio need class labels; set them to 1 for unconditional data")
            return v_t
        ys = [torch.full_like(g.labels, flow.num_classes) for g in groups]  # the null class on every row
        xs, ts, augs = list(x_t), [g.t for g in groups], [g.augment_labels for g in groups]
        ws = [None if g.w is None else torch.ones_like(g.w) for g in groups]  # the null field, at w = 1
        cond_needed = self.mix_ratio != 1.0 and len(cons)
        if cond_needed:  # conditional model velocity on consistency rows, batched with the uncond ones
            xs.append(x_t[-1]); ts.append(cons.t); ys.append(cons.labels); augs.append(cons.augment_labels)
            ws.append(cons.w)
        x, t = torch.cat(xs), torch.cat(ts)
        v_model = flow.velocity_from(x, t, call_net(net, x, t, t, torch.cat(ys), _cat(*augs), _cat(*ws)).to(x.dtype))
        v_model = list(v_model.split([len(x_) for x_ in xs]))
        v_cond = [v_pred.detach()] if len(fm) else []
        if cond_needed:
            v_cond.append(v_model.pop())
        targets = []
        for g, v, v_unc, v_c in zip(groups, v_t, v_model, v_cond + [None] * (len(groups) - len(v_cond))):
            v_g = v + self._guidance_weight(g, v) * (v - v_unc)
            v_mix = v_g if v_c is None else self.mix_ratio * v_g + (1 - self.mix_ratio) * v_c
            targets.append(torch.where(expand_as_rows(g.cfg_mask, v), v, v_mix) if g.cfg_mask is not None else v_mix)
        return targets

    def _guidance_weight(self, g: Rows, v: Tensor) -> Tensor:
        """g(t) (w - 1) of eq. (G), shaped to broadcast against v [B, ...]."""
        decay = guidance_decay(g.t, self.cfg_decay_time)
        t_lo, t_hi = self.guidance_interval
        if (t_lo, t_hi) != (0.0, 1.0):
            decay = decay * ((g.t >= t_lo) & (g.t <= t_hi)).to(decay.dtype)
        decay = expand_as_rows(decay, v)
        if g.w is None:
            return decay * (self.cfg_scale - 1)
        return decay * expand_as_rows(g.w - 1, v)

    def _velocity_loss(self, flow, fm: Rows, v_pred: Tensor, target: Tensor, stats: dict) -> Tensor:
        """L_FM = mean_i sg(w_i) mse_i,  w_i = 1 / (|d_s b(t, t)| (mse_i + eps)^p)."""
        mse = mean_per_row((v_pred - target) ** 2)
        weight = 1 / (flow.param.ds_b(fm.t, fm.t).abs() * (mse.detach() + self.eps) ** self.p)
        stats["velocity_mse"], stats["velocity_weight"] = mse.detach().mean(), weight.mean()
        return (weight * mse).mean()

    def _consistency_loss(self, flow, net, cons: Rows, x_t: Tensor, out_t: Tensor, v_mix: Tensor,
                          rng: _RngCheckpoint | None, fm_args, stats: dict) -> Tensor:
        """Solution consistency between t and the middle time l (s < l < t), target without grad:

            dq = (f(x_t, t, s) - sg f(x_t + v_mix (l - t), l, s)) / (t - l),   w = (mean dq^2 + eps)^-p.

        The loss mean_i sgn(b(t, s)) mean_d(F(x_t, t, s) sg(w dq)) has the gradient of
        sg(w) (t - l) / (2 |b|) mean_d dq^2, the weighted PDE residual, without dividing by the gap.
        The target uses the online network with the dropout masks of the forward with grad.
        """
        with torch.no_grad():
            f_t = flow.solution_from(x_t, cons.t, cons.s, out_t.detach())
            gap = expand_as_rows(cons.t - cons.l, x_t)
            x_l = x_t - v_mix * gap
            if rng is not None:
                rng.restore()
            if rng is not None and fm_args is not None:
                # Same masks need the same shapes: rerun the whole batch, keep the consistency rows.
                n_v = fm_args[0].shape[0] - len(cons)
                args = (torch.cat([fm_args[0][:n_v], x_l]), torch.cat([fm_args[1][:n_v], cons.l]), *fm_args[2:])
                out_l = call_net(net, *args)[n_v:]
            else:
                out_l = call_net(net, x_l, cons.l, cons.s, cons.labels, cons.augment_labels, cons.w)
            f_l = flow.solution_from(x_l, cons.l, cons.s, out_l.to(x_t.dtype))
            dq = (f_t - f_l) / gap
            mse = mean_per_row(dq ** 2)
            weight = (mse + self.eps) ** -self.p
            sign = torch.sign(flow.param.b(cons.t, cons.s))
        stats["consistency_mse"], stats["consistency_weight"] = mse.mean(), weight.mean()
        return (sign * mean_per_row(out_t * dq) * weight).mean()


def check_labels_for_guidance(loss: SoFlowLoss, has_labels: bool, data_name: str, key: str = "objective.") -> None:
    """Refuse the training-time guidance settings whose meaning differs from the reference trainer's.

    The reference guides only when the batch has labels and cfg_scale > 1; only then does it drop
    labels (cfg_drop_rate) and mix in the model's own velocity (mix_ratio).  This loss drops
    labels whenever cfg_drop_rate > 0 and guides whenever cfg_scale != 1 or mix_ratio != 1, so the
    combinations below would train something else under the same names.  cfg_decay_time needs no
    check: g(t) is the same function in both for every value (>= 1 switches the decay off).
    `key` prefixes the setting names in the messages (their config section).
    """
    w, m, drop = loss.cfg_scale, loss.mix_ratio, loss.cfg_drop_rate
    if loss.guidance_range is not None:
        return check_labels(loss, has_labels, data_name, key)
    if not has_labels:
        set_keys = [f"{key}{k}={v}" for k, v, off in (("cfg_scale", w, 1), ("mix_ratio", m, 1),
                                                         ("cfg_drop_rate", drop, 0)) if v != off]
        if set_keys:
            fix = " or data.conditional=true" if traits(data_name).labels == "optional" else ""
            raise ValueError(f"{', '.join(set_keys)}: training-time guidance needs class labels, but data.name="
                             f"{data_name} gives none; set {key}cfg_scale=1, {key}mix_ratio=1 and "
                             f"{key}cfg_drop_rate=0{fix}")
        return
    if w < 1:
        raise ValueError(f"{key}cfg_scale={w}: guidance scales below 1 are not trained (the reference guides "
                         f"only above 1); set {key}cfg_scale=1 (no guidance) or a value above 1")
    if w == 1 and m != 1:
        raise ValueError(f"{key}mix_ratio={m} with {key}cfg_scale=1: without guidance the reference ignores "
                         f"mix_ratio while soflow would mix in the model's own velocity; set {key}mix_ratio=1, "
                         f"or guide with {key}cfg_scale above 1")
    if w == 1 and drop > 0:
        raise ValueError(f"{key}cfg_drop_rate={drop} with {key}cfg_scale=1: the reference drops labels only "
                         f"when it guides (and refuses this pair); set {key}cfg_drop_rate=0, or guide with "
                         f"{key}cfg_scale above 1")
    if w > 1 and drop == 0:
        raise ValueError(f"{key}cfg_scale={w} with {key}cfg_drop_rate=0: the guided target needs the "
                         "unconditional velocity of the null class, which only label dropout trains; set "
                         f"{key}cfg_drop_rate above 0 (the reference uses 0.1), or {key}cfg_scale=1")
