"""Independent checks of the method math: finite differences, closed forms, float64."""

import math

import pytest
import torch

from conftest import randomize
from soflow.nets import build
from soflow.objectives import Rows, SoFlowLoss
from soflow.paths import PARAMETERIZATIONS, PATHS, conditional_velocity, interpolate, make_parameterization, make_path
from soflow.solution import SolutionFlow
from soflow.times import consistency_times, guidance_decay, logit_normal, middle_ratio


def fd(fn, x, h=1e-6):
    return (fn(x + h) - fn(x - h)) / (2 * h)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_path_derivatives_match_finite_differences(name):
    path = make_path(name)
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    assert torch.allclose(path.d_alpha(t), fd(path.alpha, t), atol=1e-8)
    assert torch.allclose(path.d_beta(t), fd(path.beta, t), atol=1e-8)
    x0, x1 = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    v = conditional_velocity(path, x0, x1, t)
    assert torch.allclose(v, fd(lambda u: interpolate(path, x0, x1, u), t), atol=1e-8)
    assert torch.allclose(interpolate(path, x0, x1, torch.zeros(7, dtype=torch.float64)), x0)
    assert torch.allclose(interpolate(path, x0, x1, torch.ones(7, dtype=torch.float64)), x1, atol=1e-12)


@pytest.mark.parametrize("name", sorted(PARAMETERIZATIONS))
def test_parameterization_boundary_and_partials(name):
    p = make_parameterization(name)
    t = torch.linspace(0.1, 0.9, 5, dtype=torch.float64)
    s = t * 0.4
    assert torch.allclose(p.a(t, t), torch.ones_like(t)) and torch.allclose(p.b(t, t), torch.zeros_like(t))
    assert torch.allclose(p.dt_a(t, s), fd(lambda u: p.a(u, s), t), atol=1e-8)
    assert torch.allclose(p.ds_a(t, s), fd(lambda u: p.a(t, u), s), atol=1e-8)
    assert torch.allclose(p.dt_b(t, s), fd(lambda u: p.b(u, s), t), atol=1e-8)
    assert torch.allclose(p.ds_b(t, s), fd(lambda u: p.b(t, u), s), atol=1e-8)
    assert (p.b(t, s) < 0).all()  # s < t: the sign the consistency loss relies on


def flow64(net_name="mlp", path="linear", param="euler", std=0.2, **kw):
    net = randomize(build(net_name, **kw), std=std).double()
    return SolutionFlow(net, path, param)


@pytest.mark.parametrize("path,param", [("linear", "euler"), ("trig", "trig"), ("linear", "trig")])
@pytest.mark.parametrize("net_name,shape,kw", [("mlp", (4, 2), dict(num_classes=3)),
                                               ("dit-tiny", (2, 4, 16, 16), dict(num_classes=3))])
def test_velocity_is_s_derivative_of_solution(path, param, net_name, shape, kw):
    """v(x, t) = d_s f(x, t, s) at s = t, by central differences on the float64 model."""
    flow = flow64(net_name, path, param, std=0.05, **kw).eval()
    x = torch.randn(shape, dtype=torch.float64)
    t = torch.linspace(0.3, 0.8, shape[0], dtype=torch.float64)
    y = torch.arange(shape[0]) % 3
    with torch.no_grad():
        f = lambda s: flow.solution_from(x, t, s, flow.net(x, t, s, y))
        numeric = fd(f, t, h=1e-7)
        v = flow.velocity(x, t, y)
        assert (v - numeric).abs().max() < 1e-7 * v.abs().max()
        assert torch.equal(flow.solution(x, t, t, y), x)  # boundary condition f(x, t, t) = x


def test_solution_rejects_s_after_t_and_bad_labels():
    flow = SolutionFlow(build("mlp", num_classes=3))
    x = torch.randn(2, 2)
    with pytest.raises(ValueError, match="s > t"):
        flow.solution(x, 0.3, 0.5)
    with pytest.raises(ValueError, match="labels must be integer class ids in \\[0, 3\\]"):
        flow.solution(x, 0.5, 0.3, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="^t must lie in"):
        flow.velocity(x, 1.5)
    with pytest.raises(ValueError, match="unknown noising path 'cosine'"):
        SolutionFlow(build("mlp"), path="cosine")
    with pytest.raises(ValueError, match="unknown middle-time schedule 'step'"):
        SoFlowLoss(schedule="step")


def test_logit_normal_and_consistency_times():
    g = torch.Generator().manual_seed(1)
    t = logit_normal(200_000, -0.4, 1.0, generator=g)
    assert abs(t.median().item() - 1 / (1 + math.exp(0.4))) < 3e-3
    t, s, l = consistency_times(100_000, -1.0, 0.8, 0.2, 0.8, ratio=0.3, generator=g)
    assert ((s < l) | (l == s)).all() and (l < t).all() and (t - s >= 0.99e-4).all() and (t - l >= 0.99e-4).all()
    free = (t - s) > 1e-3
    assert torch.allclose(l[free], (t + 0.3 * (s - t))[free])


def test_middle_ratio_closed_forms():
    r0, r1 = 0.1, 0.002
    assert middle_ratio("Exponent", 500, 1000, r0, r1) == pytest.approx(math.sqrt(r0 * r1))
    assert middle_ratio("Cosine", 500, 1000, r0, r1) == pytest.approx((r0 + r1) / 2)
    assert middle_ratio("Linear", 250, 1000, r0, r1) == pytest.approx(r0 + 0.25 * (r1 - r0))
    for name in ("Linear", "Cosine", "Exponent"):
        assert middle_ratio(name, 0, 1000, r0, r1) == pytest.approx(r0)
        assert middle_ratio(name, 1000, 1000, r0, r1) == pytest.approx(r1)
    assert middle_ratio("Const", 3, 1000, r0, r1) == r1


def test_guidance_decay_values():
    t = torch.tensor([0.5, 0.8, 0.85, 0.9, 1.0], dtype=torch.float64)
    g = guidance_decay(t, 0.8)
    d = (1 - t[2:4]) / 0.2
    assert torch.allclose(g[:2], torch.ones(2, dtype=torch.float64))
    assert torch.allclose(g[2:4], 1 - torch.exp(-0.025 * d / (1 - d)))
    assert g[4] < 1e-6
    assert torch.equal(guidance_decay(t, 1.0), torch.ones_like(t))


def batch_rows(flow, b=6, labels=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, *flow.net.sample_shape)
    x0, x1 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.rand(b, generator=g) * 0.8 + 0.15
    s = t * torch.rand(b, generator=g) * 0.9
    l = t + (s - t) * 0.1
    y = torch.randint(flow.num_classes, (b,), generator=g) if labels else None
    mask = torch.tensor([True, False] * (b // 2)) if labels else None
    if labels:
        y = torch.where(mask, torch.full_like(y, flow.num_classes), y)
    common = dict(labels=y, cfg_mask=mask)
    return Rows(x0, x1, t, t, **common), Rows(x0, x1, t, s, l, **common)


class AlwaysGuided(SoFlowLoss):
    """Runs the guidance formulas even when w = 1 and m = 1 (the real path, not a shortcut)."""

    @property
    def guided(self):
        return True


def test_guidance_with_unit_scale_and_mix_equals_unguided_loss():
    flow = SolutionFlow(randomize(build("dit-tiny", num_classes=5), std=0.05))
    fm, cons = batch_rows(flow)
    plain = SoFlowLoss(p=0.5, eps=0.01)
    guided = AlwaysGuided(p=0.5, eps=0.01, cfg_scale=1.0, mix_ratio=1.0, cfg_decay_time=0.7)
    params = [p for p in flow.parameters() if p.requires_grad]
    for a, b in zip(plain.losses(flow, fm, cons)[:2], guided.losses(flow, fm, cons)[:2]):
        ga = torch.autograd.grad(a, params, allow_unused=True, retain_graph=True)
        gb = torch.autograd.grad(b, params, allow_unused=True, retain_graph=True)
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
        for x, y in zip(ga, gb):
            assert (x is None and y is None) or torch.allclose(x, y, rtol=1e-5, atol=1e-7)
    # and w != 1 really changes it
    other = SoFlowLoss(p=0.5, eps=0.01, cfg_scale=3.0)
    assert not torch.allclose(plain.losses(flow, fm, cons)[0], other.losses(flow, fm, cons)[0])


def test_mix_ratio_scales_flow_matching_residual_by_m():
    """delta = v_pred - (m v_g + (1 - m) sg v_pred) = m (v_pred - v_g): mse scales by m^2."""
    flow = SolutionFlow(randomize(build("mlp", num_classes=4), std=0.3))
    fm, cons = batch_rows(flow, b=8)
    fm.cfg_mask = torch.zeros(8, dtype=torch.bool)
    m = 0.25
    full = SoFlowLoss(cfg_scale=2.0, mix_ratio=1.0).losses(flow, fm, cons)[2]["velocity_mse"]
    mixed = SoFlowLoss(cfg_scale=2.0, mix_ratio=m).losses(flow, fm, cons)[2]["velocity_mse"]
    assert torch.allclose(mixed, m * m * full, rtol=1e-5)


def test_consistency_loss_gradient_equals_weighted_mse_form():
    """The division-free loss has the gradient of sg(w) (t - l) / (2 |b|) mean dq^2 (float64)."""
    flow = flow64("mlp", "trig", "trig", num_classes=4)
    fm, cons = batch_rows(flow, b=8)
    cons = Rows(*(v.double() if v.is_floating_point() else v for v in (cons.x0, cons.x1, cons.t, cons.s, cons.l)),
                labels=cons.labels, cfg_mask=cons.cfg_mask)
    fm = Rows(cons.x0[:0], cons.x1[:0], cons.t[:0], cons.t[:0], labels=cons.labels[:0], cfg_mask=cons.cfg_mask[:0])
    w_cfg, m, tau = 2.0, 0.5, 0.5
    loss = SoFlowLoss(p=0.75, eps=1e-3, cfg_scale=w_cfg, mix_ratio=m, cfg_decay_time=tau)
    _, coded, _ = loss.losses(flow, fm, cons)
    g_coded = torch.autograd.grad(coded, list(flow.parameters()))
    # independent weighted-MSE form, the guided target written out from DESIGN's equation:
    # v_mix = m (v + g(t) (w - 1) (v - v_uncond)) + (1 - m) v_cond; label-dropped rows keep v
    x_t = interpolate(flow.path, cons.x0, cons.x1, cons.t)
    with torch.no_grad():
        v = conditional_velocity(flow.path, cons.x0, cons.x1, cons.t)
        v_uncond = flow.velocity(x_t, cons.t, torch.full_like(cons.labels, flow.num_classes))
        v_cond = flow.velocity(x_t, cons.t, cons.labels)
        g = guidance_decay(cons.t, tau)[:, None]
        v_mix = m * (v + g * (w_cfg - 1) * (v - v_uncond)) + (1 - m) * v_cond
        v = torch.where(cons.cfg_mask[:, None], v, v_mix)
        assert cons.cfg_mask.any() and not cons.cfg_mask.all() and (g < 1).any()  # both kinds of rows, real decay
        x_l = x_t + v * (cons.l - cons.t)[:, None]
        f_l = flow.solution_from(x_l, cons.l, cons.s, flow.net(x_l, cons.l, cons.s, cons.labels))
    f_t = flow.solution_from(x_t, cons.t, cons.s, flow.net(x_t, cons.t, cons.s, cons.labels))
    gap = (cons.t - cons.l)[:, None]
    mse = (((f_t - f_l) / gap) ** 2).mean(1)
    w = (mse.detach() + 1e-3) ** -0.75
    b = flow.param.b(cons.t, cons.s).abs()
    ref = (w * (cons.t - cons.l) / (2 * b) * mse).mean()
    g_ref = torch.autograd.grad(ref, list(flow.parameters()))
    for a, r in zip(g_coded, g_ref):
        assert torch.allclose(a, r, rtol=1e-8, atol=1e-12)


def count_forwards(net):
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append((torch.is_grad_enabled(), i[0].shape[0])))
    return calls


@pytest.mark.parametrize("cfg,expected", [
    (dict(), [(True, 8), (False, 2)]),
    (dict(cfg_scale=3.0, cfg_drop_rate=0.1), [(True, 8), (False, 8), (False, 2)]),
    (dict(cfg_scale=3.0, mix_ratio=0.5, cfg_drop_rate=0.1), [(True, 8), (False, 10), (False, 2)]),
])
def test_training_step_makes_one_forward_with_grad(cfg, expected):
    net = build("dit-tiny", num_classes=5)
    flow = SolutionFlow(net)
    calls = count_forwards(net)
    loss, stats = SoFlowLoss(velocity_loss_ratio=0.75, **cfg)(flow, torch.randn(8, 4, 16, 16), torch.randint(5, (8,)), step=10)
    loss.backward()
    assert calls == expected
    assert set(stats) >= {"velocity_mse", "velocity_weight", "consistency_mse", "consistency_weight"}
    assert all(isinstance(v, torch.Tensor) for v in stats.values())


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_consistency_target_replays_dropout_masks(ratio):
    """With dropout 0.5 and a gap of 1e-4, dq stays O(1) only if both forwards share masks."""
    net = randomize(build("unet-small", dropout=0.5), std=0.2).train()
    flow = SolutionFlow(net)
    b = 4
    x0, x1 = torch.randn(b, 3, 16, 16), torch.randn(b, 3, 16, 16)
    t = torch.full((b,), 0.6)
    n_v = int(ratio * b)
    fm = Rows(x0[:n_v], x1[:n_v], t[:n_v], t[:n_v])
    cons = Rows(x0[n_v:], x1[n_v:], t[n_v:], t[n_v:] - 0.3, t[n_v:] - 1e-4)
    stats = SoFlowLoss(p=0.0).losses(flow, fm, cons)[2]
    with torch.no_grad():  # what the quotient would be with fresh masks
        x_t = interpolate(flow.path, cons.x0, cons.x1, cons.t)
        fresh = (net(x_t, cons.t, cons.s) - net(x_t, cons.t, cons.s)).pow(2).mean() * (0.3 / 1e-4) ** 2
    assert stats["consistency_mse"] < 1e-3 * fresh


def test_losses_are_finite_and_train_toy_model():
    """A few hundred steps on a 2-D mixture reduce the 1-NFE error: the objective learns."""
    torch.manual_seed(0)
    centers = torch.tensor([[2.0, 2.0], [-2.0, -2.0]])
    flow = SolutionFlow(build("mlp", hidden=64, depth=2))
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    objective = SoFlowLoss(p=0.5, eps=0.01, schedule="const", r_end=0.05, velocity_loss_ratio=0.5, total_steps=300)

    def one_nfe_error():
        with torch.no_grad():
            x = flow.solution(torch.randn(2000, 2), 1.0, 0.0)
        return torch.cdist(x, centers).min(dim=1).values.mean().item()

    before = one_nfe_error()
    for step in range(300):
        x0 = centers[torch.randint(2, (256,))] + 0.1 * torch.randn(256, 2)
        loss, _ = objective(flow, x0, step=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = one_nfe_error()
    assert after < 0.5 * before and after < 0.6
