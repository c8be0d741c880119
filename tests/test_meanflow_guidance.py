"""MeanFlow trained over a range of guidance scales (meanflow.guidance_range): the w-conditioned
target against its equation in float64, the option off leaving MeanFlow's loss as it was, fixed-scale
weights loading unchanged, one network forward per sampling step at any w, one-line refusals, and a
short real training run whose samples depend on w."""

import json

import numpy as np
import pytest
import torch

from conftest import randomize
from helpers import assert_one_line_error, soflow_inproc
from soflow import Pipeline
from soflow.errors import ConfigError
from soflow.guidance import GuidanceScales
from soflow.nets import build
from soflow.objectives import MeanFlowLoss
from soflow.run.build import build_flow, guidance_scales
from soflow.run.checkpoint import export_safetensors
from soflow.run.config import load
from soflow.run.init import initial_weights
from soflow.solution import SolutionFlow
from test_data import fake_fmnist
from test_guidance import check_one_forward_per_step, check_scales_refused

TINY_DIT = "model.net_args={patch_size: 7, hidden_size: 16, depth: 1, num_heads: 2}"
SHAPE = (1, 28, 28)
# MeanFlow at omega = 1.5, kappa = 0.25: CFG scale omega / (1 - kappa) = 2
FIXED = [TINY_DIT, "method=meanflow", "meanflow.omega=1.5", "meanflow.kappa=0.25", "meanflow.cfg_drop_rate=0.1"]
ANY = FIXED + ["meanflow.guidance_range=[1.0, 4.0]"]  # the same, trained on w in [1, 4]; default 2


def _mlp(k=3, guidance_input=True, seed=0):
    return randomize(build("mlp", dim=2, hidden=16, depth=2, num_classes=k, guidance_input=guidance_input),
                     std=0.3, seed=seed).double()


def _batch(n, k, seed=3):
    """Data, noise, times (some r = t, two t outside [0.2, 0.9]), labels, a drop mask and per-row w
    (1 on the dropped rows), in float64."""
    g = torch.Generator().manual_seed(seed)
    x0, x1 = (torch.randn(n, 2, generator=g, dtype=torch.float64) for _ in range(2))
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    r = t * torch.rand(n, generator=g, dtype=torch.float64)
    t[0], t[3] = 0.95, 0.1
    r[2], r[5] = t[2], t[5]  # r = t rows: a plain forward, target v_tilde
    mask = torch.arange(n) % 3 == 1
    labels = torch.arange(n) % k
    w = torch.where(mask, torch.ones(n, dtype=torch.float64), 1 + 3 * torch.rand(n, generator=g, dtype=torch.float64))
    return x0, x1, t, r, labels, mask, w


# ---------------------------------------------------------------- the loss, eq. (MG), in float64

def _expected_loss(net, x0, x1, t, r, labels, mask, w, kappa, t_min, t_max, p, c, null):
    """MeanFlow's loss written out with each row's w:  omega = w (1 - kappa),
    v_tilde = omega v + kappa F(z, t, t | y, w) + (1 - omega - kappa) F(z, t, t | null, 1) for kept
    rows with t_min <= t <= t_max, v elsewhere;  u_tgt = v_tilde - (t - r) du/dt with du/dt the JVP of
    (z, t, r) -> F(z, t, r | y', w) along (v_tilde, 1, 0), y' the label-dropped labels."""
    F = lambda z, t, r, y, w: net(z, t, r, y, None, guidance=w)  # noqa: E731
    y = torch.where(mask, torch.full_like(labels, null), labels)
    z, v = (1 - t)[:, None] * x0 + t[:, None] * x1, x1 - x0
    with torch.no_grad():
        u_c = F(z, t, t, labels, w)
        u_null = F(z, t, t, torch.full_like(labels, null), torch.ones_like(w))
        omega = (w * (1 - kappa))[:, None]
        v_guided = omega * v + kappa * u_c + (1 - omega - kappa) * u_null
        use = ((t >= t_min) & (t <= t_max) & ~mask)[:, None]
        v_tilde = torch.where(use, v_guided, v)
    _, dudt = torch.autograd.functional.jvp(lambda z_, t_, r_: F(z_, t_, r_, y, w), (z, t, r),
                                            (v_tilde, torch.ones_like(t), torch.zeros_like(r)))
    u_tgt = v_tilde - (t - r)[:, None] * dudt
    sq = ((F(z, t, r, y, w) - u_tgt) ** 2).sum(dim=1)
    return (sq / (sq.detach() + c) ** p).mean()


@pytest.mark.parametrize("kappa", [0.0, 0.4])
def test_conditioned_meanflow_loss_matches_its_equation_in_float64(kappa):
    k = 3
    net = _mlp(k)
    flow = SolutionFlow(net)
    x0, x1, t, r, labels, mask, w = _batch(9, k)
    loss_fn = MeanFlowLoss(p=0.75, c=1e-3, omega=1.0, kappa=kappa, guidance_range=(1.0, 4.0), cfg_drop_rate=0.2,
                           t_min=0.2, t_max=0.9)
    loss, stats = loss_fn.loss_on(flow, x0, x1, t, r, labels, mask, w=w)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    want = _expected_loss(net, x0, x1, t, r, labels, mask, w, kappa, 0.2, 0.9, 0.75, 1e-3, k)
    want_grads = torch.autograd.grad(want, list(net.parameters()))
    assert torch.allclose(loss, want, rtol=1e-12, atol=0)
    for a, b in zip(grads, want_grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)
    assert all(not s.requires_grad for s in stats.values())
    # w reaches the target and the network: other scales on the kept rows give another loss ...
    other = torch.where(mask, w, w + 0.5)
    assert not torch.allclose(loss_fn.loss_on(flow, x0, x1, t, r, labels, mask, w=other)[0], loss)
    # ... while a dropped row trains at w = 1 whatever it is handed
    ignored = torch.where(mask, w + 2.0, w)
    assert torch.equal(loss_fn.loss_on(flow, x0, x1, t, r, labels, mask, w=ignored)[0], loss)


def test_one_scale_on_every_row_is_the_fixed_scale_loss():
    # with a zero guidance embedding and w = omega / (1 - kappa) on every kept row, eq. (MG) is
    # MeanFlow's fixed-scale target: same loss and gradients as the network without the w input
    k = 3
    fixed = _mlp(k, guidance_input=False, seed=1)
    cond = build("mlp", dim=2, hidden=16, depth=2, num_classes=k, guidance_input=True).double()
    cond.load_state_dict(fixed.state_dict(), strict=False)
    x0, x1, t, r, labels, mask, _ = _batch(9, k, seed=5)
    w = torch.where(mask, 1.0, 2.0).double()
    kw = dict(kappa=0.25, cfg_drop_rate=0.2, t_min=0.2, t_max=0.9)
    want, _ = MeanFlowLoss(omega=1.5, **kw).loss_on(SolutionFlow(fixed), x0, x1, t, r, labels, mask)
    got, _ = MeanFlowLoss(guidance_range=(1.0, 4.0), omega=1.5, **kw).loss_on(SolutionFlow(cond), x0, x1, t, r,
                                                                               labels, mask, w=w)
    assert torch.allclose(got, want, rtol=1e-13, atol=0)
    shared = [n for n, _ in fixed.named_parameters()]
    g_want = torch.autograd.grad(want, list(fixed.parameters()))
    g_got = torch.autograd.grad(got, [dict(cond.named_parameters())[n] for n in shared])
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_every_forward_of_the_conditional_model_gets_the_rows_scale():
    # the forwards with grad (JVP rows and r = t rows) and u_c at the row's w, u_null at w = 1
    k = 3
    net = _mlp(k).float()
    seen = []
    net.register_forward_hook(lambda m, args, kwargs, out: seen.append(
        (torch.is_grad_enabled(), args[3].clone(), kwargs["guidance"].clone())), with_kwargs=True)
    x0, x1, t, r, labels, mask, w = (a.float() if a.is_floating_point() else a for a in _batch(9, k))
    MeanFlowLoss(kappa=0.4, guidance_range=(1.0, 4.0), cfg_drop_rate=0.2).loss_on(
        SolutionFlow(net), x0, x1, t, r, labels, mask, w=w)
    (_, y_g, w_g), = [s for s in seen if not s[0]]  # one forward without grad: conditional and null rows
    assert torch.equal(y_g, torch.cat([labels, torch.full_like(labels, k)]))
    assert torch.equal(w_g, torch.cat([w, torch.ones_like(w)]))
    with_grad = [s for s in seen if s[0]]
    assert sorted(len(s[1]) for s in with_grad) == [2, 7]  # the JVP rows and the r = t rows
    moving = r != t
    for y_s, w_s in [s[1:] for s in with_grad]:
        rows = moving if len(y_s) == 7 else ~moving
        assert torch.equal(w_s, w[rows])
        assert torch.equal(y_s, torch.where(mask, k, labels)[rows])


def test_training_draws_a_scale_per_row_with_dropped_rows_at_one():
    torch.manual_seed(0)
    loss_fn = MeanFlowLoss(omega=1.6, kappa=0.2, guidance_range=(1.5, 3.0), guidance_distribution="log-uniform",
                           cfg_drop_rate=0.3)
    net = _mlp(3).float()
    drawn = []
    net.register_forward_hook(lambda m, args, kwargs, out: drawn.append((torch.is_grad_enabled(), args[3],
                                                                        kwargs["guidance"])), with_kwargs=True)
    loss, _ = loss_fn(SolutionFlow(net), torch.randn(64, 2), torch.randint(3, (64,)))
    loss.backward()
    ys, ws = torch.cat([y for g, y, _ in drawn if g]), torch.cat([w for g, _, w in drawn if g])
    dropped = ys == 3
    assert 0 < int(dropped.sum()) < 64
    assert torch.equal(ws[dropped], torch.ones_like(ws[dropped]))
    assert bool(((ws[~dropped] >= 1.5) & (ws[~dropped] <= 3.0)).all()) and len(ws[~dropped].unique()) > 10


# ---------------------------------------------------------------- off: MeanFlow as it was

@pytest.mark.parametrize("kw", [dict(), dict(omega=1.5, kappa=0.3, cfg_drop_rate=0.2, t_min=0.1, t_max=0.8),
                                dict(omega=2.0, cfg_drop_rate=0.3, p=0.5, reduction="mean", r_neq_t_split="steps",
                                     ratio_r_neq_t=0.5)])
def test_off_leaves_the_meanflow_loss_unchanged(kw):
    # guidance_range null (the default) draws nothing more and calls the network as before, without w
    net = randomize(build("mlp", dim=2, hidden=32, depth=2, num_classes=3), std=0.3)
    flow = SolutionFlow(net)
    calls = []
    net.register_forward_hook(lambda m, args, kwargs, out: calls.append(sorted(kwargs)), with_kwargs=True)

    def run(loss_fn):
        torch.manual_seed(11)
        out = []
        for step in range(3):
            loss, stats = loss_fn(flow, torch.randn(16, 2), torch.randint(3, (16,)), step)
            out += [loss.detach(), *stats.values(), *torch.autograd.grad(loss, list(net.parameters()))]
        return out + [torch.rand(4)]  # the global generator ends where it did

    plain = run(MeanFlowLoss(**kw))
    off = run(MeanFlowLoss(guidance_range=None, guidance_distribution="log-uniform", **kw))
    assert len(plain) == len(off) and all(torch.equal(a, b) for a, b in zip(plain, off))
    assert calls and all(c == [] for c in calls)
    assert MeanFlowLoss(**kw).row_scales(16, None, "cpu") is None
    with pytest.raises(ValueError, match="exactly when guidance_range is set"):
        MeanFlowLoss(**kw).loss_on(flow, torch.randn(4, 2), torch.randn(4, 2), torch.ones(4), torch.zeros(4),
                                   w=torch.ones(4))


# ---------------------------------------------------------------- loading, sampling at any w

def _export(tmp_path, cfg, seed):
    flow = build_flow(cfg, SHAPE, 10)
    randomize(flow.net, std=0.05, seed=seed)
    path = tmp_path / f"{cfg.method}-{seed}.safetensors"
    export_safetensors(path, flow.net.state_dict(), cfg.to_dict(), 7, SHAPE, 10)
    return flow, path


@pytest.fixture
def fixed_and_conditioned(tmp_path):
    cfg = load("fmnist", FIXED)
    fixed, path = _export(tmp_path, cfg, seed=1)
    ccfg = load("fmnist", ANY)
    cond = build_flow(ccfg, SHAPE, 10)
    state, _ = initial_weights(path, cond.net)
    cond.net.load_state_dict(state)
    return (cfg, fixed), (ccfg, cond)


def test_scales_of_a_meanflow_model_trained_over_a_range():
    assert guidance_scales(load("fmnist", ANY)) == GuidanceScales("input", 2.0, 1.0, 4.0)
    assert guidance_scales(load("fmnist", FIXED)) == GuidanceScales("trained", 2.0, 2.0, 2.0,
                                                                    "meanflow.omega=1.5, kappa=0.25")
    # the defaults omega = 1, kappa = 0 sample at w = 1, the range's low end
    plain = load("fmnist", [TINY_DIT, "method=meanflow", "meanflow.cfg_drop_rate=0.1",
                            "meanflow.guidance_range=[1, 3]"])
    assert guidance_scales(plain) == GuidanceScales("input", 1.0, 1.0, 3.0)
    assert load("fmnist", ANY + ["train.fid_guidance=[1, 2.5, 4]"]).train.fid_guidance == [1, 2.5, 4]


def test_fixed_scale_meanflow_weights_load_into_the_conditioned_network(fixed_and_conditioned):
    (cfg, fixed), (ccfg, cond) = fixed_and_conditioned
    emb = cond.net.w_embedder.mlp
    assert not emb[2].weight.any() and not emb[2].bias.any()
    labels = torch.arange(6) % 10
    for nfe, mode in ((1, None), (2, "chain"), (2, "renoise")):
        want = Pipeline(fixed, cfg).sample(6, nfe, labels=labels, seed=4, mode=mode)  # trained at w = 2
        got = Pipeline(cond, ccfg).sample(6, nfe, labels=labels, seed=4, guidance=2.0, mode=mode)
        assert torch.equal(got, want)
    # left out, the scale is the default omega / (1 - kappa) = 2
    assert torch.equal(Pipeline(cond, ccfg).sample(6, 1, labels=labels, seed=4),
                       Pipeline(fixed, cfg).sample(6, 1, labels=labels, seed=4))
    # and it trains: the embedder's output layer gets gradient from the first step
    loss, _ = ccfg.meanflow(cond, torch.randn(8, *SHAPE), torch.arange(8) % 10)
    loss.backward()
    assert emb[2].weight.grad.abs().sum() > 0


def test_one_forward_per_step_at_any_scale(fixed_and_conditioned):
    _, (ccfg, cond) = fixed_and_conditioned
    check_one_forward_per_step(cond, ccfg)


# ---------------------------------------------------------------- refusals

def test_scales_a_meanflow_model_cannot_honour_are_refused_in_one_line(fixed_and_conditioned):
    check_scales_refused(fixed_and_conditioned, "meanflow.omega=1.5, kappa=0.25")


@pytest.mark.parametrize("overrides, needle", [
    (["meanflow.guidance_range=[3, 2]"], "meanflow.guidance_range: expected 1 <= w_lo < w_hi"),
    (["meanflow.guidance_range=[0.5, 3]"], "meanflow.guidance_range: expected 1 <= w_lo < w_hi"),
    (["meanflow.guidance_range=[1, 2, 3]"], "meanflow.guidance_range: expected 2 numbers"),
    (["meanflow.omega=3.5"], "meanflow.omega: with guidance_range [1.0, 4.0] omega / (1 - kappa) is the scale sampled"),
    (["meanflow.kappa=0.8", "meanflow.omega=0.1"], "meanflow.omega: with guidance_range [1.0, 4.0]"),
    (["meanflow.kappa=1"], "meanflow.kappa: with guidance_range each row trains at omega = w (1 - kappa)"),
    (["meanflow.kappa=-0.5"], "meanflow.kappa: with guidance_range"),
    (["meanflow.guidance_distribution=normal"], "meanflow.guidance_distribution: unknown"),
    (["meanflow.cfg_drop_rate=0"], "meanflow.guidance_range=[1.0, 4.0] with meanflow.cfg_drop_rate=0"),
    (["data.conditional=false"], "meanflow.guidance_range=[1.0, 4.0]: guidance as a network input needs class"),
    (["model.net=unet-small", "model.net_args={}"], "meanflow.guidance_range: network unet-small cannot take"),
    (["train.fid_guidance=[1, 6]"], "train.fid_guidance: scale 6: this model takes"),
])
def test_bad_meanflow_guidance_settings(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load("fmnist", ANY + overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_fixed_scale_meanflow_refuses_other_training_fid_scales():
    with pytest.raises(ConfigError) as e:
        load("fmnist", FIXED + ["train.fid_guidance=[3]"])
    assert "train.fid_guidance: scale 3: this model has guidance 2 built in" in str(e.value)


# ---------------------------------------------------------------- a short real training run

def test_short_training_run_samples_differently_at_two_scales(tmp_path):
    # the command line end to end: train a few steps, sample at two scales, refuse one, export
    data = fake_fmnist(tmp_path / "fm", n=24)
    run = tmp_path / "run"
    sets = [x for o in ANY + [f"data.path={data}", "train.batch_size=8", "train.total_steps=8", "train.lr=0.03",
                                            "train.sample_nfe=[1]"]
            for x in ("--set", o)]
    soflow_inproc("train", "--config", "fmnist", "--run-dir", run, *sets, check=True)
    proc = soflow_inproc("sample", "--checkpoint", run, "--num", 4, "--guidance", 5, "--out", tmp_path / "x.png")
    assert_one_line_error(proc, "--guidance 5.0", "trained on [1, 4]")
    outs = {}
    for w in (1.5, 3.5):
        out = tmp_path / f"w{w}.npy"
        proc = soflow_inproc("sample", "--checkpoint", run, "--num", 4, "--nfe", 1, "--class", 3, "--guidance", w,
                             "--weights", "online", "--out", out, check=True)
        assert f"guidance {w:g}" in proc.stdout
        outs[w] = np.load(out)
    assert outs[1.5].shape == outs[3.5].shape and np.isfinite(outs[1.5]).all()
    # w reaches the output through three layers that start at zero (the w embedding's last layer, the
    # DiT's adaLN modulation and its final layer), so its effect grows like (steps x lr)^3: about 1e-2
    # here, and exactly 0 for an untrained embedding
    assert np.abs(outs[1.5] - outs[3.5]).max() > 1e-3
    soflow_inproc("export", "--checkpoint", run, "--out", tmp_path / "hub", check=True)
    info = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert info["guidance"] == {"kind": "input", "default": 2.0, "range": [1.0, 4.0]}
    assert "guidance=W" in (tmp_path / "hub" / "README.md").read_text()
