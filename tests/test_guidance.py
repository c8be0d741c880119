"""Guidance chosen at sampling time: the w-conditioned SoFlow loss against its equation in float64,
the zero-output guidance embedding (fixed-scale and flow-matching weights load unchanged), one
network forward per sampling step at any w, and one-line refusals."""

import json
import math

import pytest
import torch

from conftest import randomize
from helpers import assert_one_line_error, soflow_inproc
from soflow import Pipeline
from soflow.errors import ConfigError
from soflow.eval.fid import metric_name
from soflow.guidance import GuidanceScales
from soflow.nets import build
from soflow.objectives import Rows, SoFlowLoss
from soflow.objectives.scales import draw_scales
from soflow.run.build import build_flow, guidance_scales
from soflow.run.checkpoint import export_safetensors
from soflow.run.config import load
from soflow.run.init import initial_weights
from soflow.sampling import draw_inputs
from soflow.solution import SolutionFlow
from soflow.times import guidance_decay
from test_data import fake_fmnist

TINY_DIT = "model.net_args={patch_size: 7, hidden_size: 16, depth: 1, num_heads: 2}"
SHAPE = (1, 28, 28)


# ---------------------------------------------------------------- the loss, eq. (G), in float64

def _expected_losses(net, fm: Rows, cons: Rows, loss: SoFlowLoss, null: int):
    """Both losses written out for the linear path and Euler parameterization, f = x + (s - t) F,
    v = F(x, t, t):  v_g = v + g(t) 1[t_lo <= t <= t_hi] (w - 1) (v - F(x_t, t, t | null, 1)),
    v_mix = m v_g + (1 - m) F(x_t, t, t | y, w), dropped rows v."""
    F = lambda x, t, s, y, w: net(x, t, s, y, None, guidance=w)  # noqa: E731
    m, eps, p = loss.mix_ratio, loss.eps, loss.p
    t_lo, t_hi = loss.guidance_interval

    def target(r: Rows):
        x_t = (1 - r.t[:, None]) * r.x0 + r.t[:, None] * r.x1
        v = r.x1 - r.x0
        v_unc = F(x_t, r.t, r.t, torch.full_like(r.labels, null), torch.ones_like(r.w))
        v_c = F(x_t, r.t, r.t, r.labels, r.w)
        inside = ((r.t >= t_lo) & (r.t <= t_hi)).double()
        gain = (guidance_decay(r.t, loss.cfg_decay_time) * inside * (r.w - 1))[:, None]
        v_mix = m * (v + gain * (v - v_unc)) + (1 - m) * v_c
        return x_t, torch.where(r.cfg_mask[:, None], v, v_mix), v_c

    x_t, tgt, pred = target(fm)
    mse = ((pred - tgt) ** 2).mean(1)
    velocity = (mse / (mse + eps) ** p).mean()

    x_t, tgt, _ = target(cons)
    gap = (cons.t - cons.l)[:, None]
    out_t = F(x_t, cons.t, cons.s, cons.labels, cons.w)
    f_t = x_t + (cons.s - cons.t)[:, None] * out_t
    x_l = x_t - tgt * gap
    f_l = x_l + (cons.s - cons.l)[:, None] * F(x_l, cons.l, cons.s, cons.labels, cons.w)
    dq = (f_t - f_l) / gap
    weight = ((dq ** 2).mean(1) + eps) ** -p
    consistency = (-(out_t * dq).mean(1) * weight).mean()  # sign of b(t, s) = s - t < 0
    return velocity, consistency


def test_conditioned_loss_matches_its_equation_in_float64():
    k = 3
    net = randomize(build("mlp", dim=2, hidden=16, depth=2, num_classes=k, guidance_input=True), std=0.3).double()
    flow = SolutionFlow(net)
    loss = SoFlowLoss(p=0.75, mix_ratio=0.6, cfg_scale=2.0, cfg_drop_rate=0.2, cfg_decay_time=0.8,
                      guidance_range=(1.0, 4.0), guidance_interval=(0.1, 0.9))
    g = torch.Generator().manual_seed(3)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731

    def rows(n, t, s=None, l=None):
        mask = torch.arange(n) % 3 == 1  # a dropped label in every third row: null id and w = 1
        labels = torch.where(mask, torch.full((n,), k), torch.arange(n) % k)
        w = torch.where(mask, torch.ones(n, dtype=torch.float64), 1 + 3 * torch.rand(n, generator=g, dtype=torch.float64))
        return Rows(rnd(n, 2), rnd(n, 2), t, t if s is None else s, l, labels=labels, cfg_mask=mask, w=w)

    t_fm = torch.tensor([0.05, 0.3, 0.5, 0.85, 0.95, 0.7], dtype=torch.float64)  # two outside [0.1, 0.9]
    t_c = torch.tensor([0.95, 0.6, 0.4, 0.9, 0.2], dtype=torch.float64)
    s_c = t_c * 0.3
    fm, cons = rows(6, t_fm), rows(5, t_c, s_c, t_c + (s_c - t_c) * 0.25)
    velocity, consistency, _ = loss.losses(flow, fm, cons)
    with torch.no_grad():
        want_v, want_c = _expected_losses(net, fm, cons, loss, k)
    assert torch.allclose(velocity, want_v, rtol=1e-12, atol=0)
    assert torch.allclose(consistency, want_c, rtol=1e-12, atol=0)
    # w reaches the target and the network: other scales on the kept rows give another loss
    fm.w = torch.where(fm.cfg_mask, fm.w, fm.w + 0.5)
    assert not torch.allclose(loss.losses(flow, fm, cons)[0], velocity)


def test_row_scales_follow_the_configured_distribution():
    torch.manual_seed(0)
    lo, hi, n = 1.0, 4.0, 200_000
    uniform, log_uniform = draw_scales(n, lo, hi, "uniform"), draw_scales(n, lo, hi, "log-uniform")
    for w in (uniform, log_uniform):
        assert lo <= w.min() and w.max() <= hi
    assert uniform.median().item() == pytest.approx((lo + hi) / 2, abs=0.02)  # U(1, 4)
    assert log_uniform.median().item() == pytest.approx(math.sqrt(lo * hi), abs=0.02)  # log w ~ U(0, log 4)
    mask = torch.arange(10) % 2 == 0
    w = SoFlowLoss(cfg_scale=2.0, guidance_range=(1.5, 3.0), cfg_drop_rate=0.1).row_scales(10, mask, "cpu")
    assert torch.equal(w[mask], torch.ones(5)) and bool(((w[~mask] >= 1.5) & (w[~mask] <= 3.0)).all())
    assert SoFlowLoss().row_scales(10, mask, "cpu") is None  # off: no draw, the reference path


# ---------------------------------------------------------------- zero-output embedding, loading

def _export(tmp_path, cfg, seed):
    flow = build_flow(cfg, SHAPE, 10)
    randomize(flow.net, std=0.05, seed=seed)
    path = tmp_path / f"{cfg.method}-{seed}.safetensors"
    export_safetensors(path, flow.net.state_dict(), cfg.to_dict(), 7, SHAPE, 10)
    return flow, path


def _conditioned(path):
    cfg = load("fmnist-any-guidance", [TINY_DIT])
    flow = build_flow(cfg, SHAPE, 10)
    state, _ = initial_weights(path, flow.net)
    flow.net.load_state_dict(state)
    return cfg, flow


@pytest.fixture
def fixed_and_conditioned(tmp_path):
    cfg = load("fmnist", [TINY_DIT])
    fixed, path = _export(tmp_path, cfg, seed=1)
    return (cfg, fixed), _conditioned(path)


def test_fixed_scale_weights_load_into_the_conditioned_network_with_identical_samples(fixed_and_conditioned):
    (cfg, fixed), (ccfg, cond) = fixed_and_conditioned
    emb = cond.net.w_embedder.mlp
    assert emb[0].weight.abs().sum() > 0 and not emb[2].weight.any() and not emb[2].bias.any()
    labels = torch.arange(6) % 10
    for nfe in (1, 2):
        want = Pipeline(fixed, cfg).sample(6, nfe, labels=labels, seed=4)  # trained at w = 2
        got = Pipeline(cond, ccfg).sample(6, nfe, labels=labels, seed=4, guidance=2.0)
        assert torch.equal(got, want)
    # and it trains: the embedder's output layer gets gradient from the first step
    loss, _ = ccfg.objective(cond, torch.randn(8, *SHAPE), torch.arange(8) % 10)
    loss.backward()
    assert emb[2].weight.grad.abs().sum() > 0


def test_flow_matching_weights_load_into_the_conditioned_network(tmp_path):
    cfg = load("fmnist", [TINY_DIT, "method=flow_matching", "flow_matching.cfg_drop_rate=0.1"])
    fm, path = _export(tmp_path, cfg, seed=2)
    _, cond = _conditioned(path)
    x, t, s, y = torch.randn(4, *SHAPE), torch.rand(4), torch.zeros(4), torch.tensor([0, 3, 10, 9])
    with torch.no_grad():
        for w in (1.0, 3.5):
            assert torch.equal(cond.net(x, t, s, y, guidance=torch.full((4,), w)), fm.net(x, t, s, y))


# ---------------------------------------------------------------- one forward per step at any w

def _count_forwards(net):
    calls = []
    net.register_forward_hook(lambda m, args, kwargs, out: calls.append(args[0].shape[0]), with_kwargs=True)
    return calls


def check_one_forward_per_step(cond, ccfg):
    """A model with w as an input samples at any w with one forward of the batch per step, and the
    scale reaches the network: its 1-NFE samples are f(z, 1, 0) = z - F(z, 1, 0 | y, w)."""
    randomize(cond.net.w_embedder, std=0.3, seed=5)  # a trained embedder: w changes the output
    pipe = Pipeline(cond, ccfg)
    calls = _count_forwards(cond.net)
    for nfe, mode in ((1, None), (3, "chain"), (3, "renoise")):
        for w in (1.0, 2.5, 4.0):
            calls.clear()
            pipe.sample(5, nfe, seed=0, guidance=w, mode=mode)
            assert calls == [5] * nfe  # one forward of the batch itself per step, never a doubled one
    z, y = draw_inputs(SHAPE, 1, 10, 0, range(5))
    z = z[:, 0]
    outs = {}
    for w in (1.5, 3.0):
        with torch.no_grad():
            want = z - cond.net(z, torch.ones(5), torch.zeros(5), y, guidance=torch.full((5,), w))
        outs[w] = pipe.sample(5, 1, seed=0, guidance=w)
        assert torch.allclose(outs[w], want, atol=1e-6)
    assert not torch.allclose(outs[1.5], outs[3.0])


def test_one_forward_per_step_at_any_scale(fixed_and_conditioned):
    _, (ccfg, cond) = fixed_and_conditioned
    check_one_forward_per_step(cond, ccfg)


def test_flow_matching_guidance_keeps_its_two_forwards(tmp_path):
    cfg = load("fmnist", [TINY_DIT, "method=flow_matching", "flow_matching.cfg_drop_rate=0.1"])
    fm, _ = _export(tmp_path, cfg, seed=2)
    calls = _count_forwards(fm.net)
    Pipeline(fm, cfg).sample(3, 2, seed=0, guidance=2.0)
    assert calls == [6, 6]  # conditional and null rows in one batch, as before
    calls.clear()
    Pipeline(fm, cfg).sample(3, 2, seed=0)  # its own scale: 1
    assert calls == [3, 3]


# ---------------------------------------------------------------- what each kind honours, refusals

def test_scales_each_kind_of_model_honours():
    assert guidance_scales(load("fmnist-any-guidance")) == GuidanceScales("input", 2.0, 1.0, 4.0)
    assert guidance_scales(load("fmnist")) == GuidanceScales("trained", 2.0, 2.0, 2.0, "objective.cfg_scale")
    mf = guidance_scales(load("fmnist", ["method=meanflow", "meanflow.kappa=0.5", "meanflow.cfg_drop_rate=0.1"]))
    assert (mf.kind, mf.default) == ("trained", 2.0)  # omega / (1 - kappa)
    assert guidance_scales(load("fmnist", ["method=flow_matching"])).kind == "sampling"
    assert metric_name(1) == "fid_nfe1" and metric_name(2, 1.5) == "fid_nfe2_w1.5"


def check_scales_refused(fixed_and_conditioned, built_in):
    """A fixed-scale model refuses another scale (naming its setting `built_in`); a model trained on
    [1, 4] refuses scales outside it and non-numbers: each in one line starting `guidance W: `."""
    (cfg, fixed), (ccfg, cond) = fixed_and_conditioned
    for pipe, w, needle in ((Pipeline(fixed, cfg), 3.0, f"built in by training ({built_in})"),
                            (Pipeline(cond, ccfg), 4.5, "trained on [1, 4]"),
                            (Pipeline(cond, ccfg), 0.5, "trained on [1, 4]"),
                            (Pipeline(cond, ccfg), float("nan"), "finite number")):
        with pytest.raises(ConfigError) as e:
            pipe.sample(2, 1, guidance=w)
        assert str(e.value).startswith(f"guidance {w}: ") and needle in str(e.value) and "\n" not in str(e.value)


def test_scales_a_model_cannot_honour_are_refused_in_one_line(fixed_and_conditioned):
    check_scales_refused(fixed_and_conditioned, "objective.cfg_scale")
    (cfg, fixed), (ccfg, cond) = fixed_and_conditioned
    assert torch.equal(Pipeline(fixed, cfg).sample(2, 1, guidance=2.0), Pipeline(fixed, cfg).sample(2, 1))
    with pytest.raises(ValueError, match="takes the guidance scale w as an input"):
        cond.net(torch.randn(1, *SHAPE), torch.ones(1), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="does not take a guidance scale"):
        fixed.net(torch.randn(1, *SHAPE), torch.ones(1), torch.zeros(1), guidance=torch.ones(1))


@pytest.mark.parametrize("source, overrides, needle", [
    ("fmnist", ["objective.guidance_range=[3, 2]"], "objective.guidance_range: expected 1 <= w_lo < w_hi"),
    ("fmnist", ["objective.guidance_range=[0.5, 3]"], "objective.guidance_range: expected 1 <= w_lo < w_hi"),
    ("fmnist", ["objective.guidance_range=[1, 2, 3]"], "objective.guidance_range: expected 2 numbers"),
    ("fmnist-any-guidance", ["objective.cfg_scale=5"], "objective.cfg_scale: with guidance_range [1.0, 4.0]"),
    ("fmnist-any-guidance", ["objective.guidance_distribution=normal"], "objective.guidance_distribution: unknown"),
    ("fmnist-any-guidance", ["objective.guidance_interval=[0.6, 0.2]"], "objective.guidance_interval: expected"),
    ("fmnist-any-guidance", ["objective.cfg_drop_rate=0"], "objective.guidance_range=[1.0, 4.0] with "
                                                           "objective.cfg_drop_rate=0"),
    ("fmnist-any-guidance", ["data.conditional=false"], "guidance as a network input needs class labels"),
    ("fmnist-any-guidance", ["model.net=unet-small", "model.net_args={}"], "network unet-small cannot take"),
    ("fmnist", ["train.fid_guidance=[3]"], "train.fid_guidance: scale 3: this model has guidance 2 built in"),
    ("fmnist-any-guidance", ["train.fid_guidance=[2, 2]"], "train.fid_guidance: [2, 2] repeats"),
    ("fmnist-any-guidance", ["train.fid_guidance=[1, 6]"], "train.fid_guidance: scale 6: this model takes"),
    ("fmnist", ["method=flow_matching", "train.fid_guidance=[2]"], "scale 2: the model was trained without label"),
])
def test_bad_guidance_settings(source, overrides, needle):
    with pytest.raises(ConfigError) as e:
        load(source, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_samples_at_a_chosen_scale_and_exports_the_range(tmp_path):
    data = fake_fmnist(tmp_path / "fm", n=20)
    run = tmp_path / "run"
    soflow_inproc("train", "--config", "fmnist-any-guidance", "--run-dir", run, "--set", f"data.path={data}",
                  "--set", "train.batch_size=4", "--set", "train.total_steps=1", "--set", "train.sample_nfe=[1]",
                  "--set", TINY_DIT, check=True)
    proc = soflow_inproc("sample", "--checkpoint", run, "--num", 4, "--guidance", 5, "--out", tmp_path / "x.png")
    assert_one_line_error(proc, "--guidance 5.0", "trained on [1, 4]")
    proc = soflow_inproc("sample", "--checkpoint", run, "--num", 4, "--nfe", 1, "--guidance", 3,
                         "--out", tmp_path / "x.npy", check=True)
    assert "guidance 3" in proc.stdout and (tmp_path / "x.npy").is_file()
    soflow_inproc("export", "--checkpoint", run, "--out", tmp_path / "hub", check=True)
    info = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert info["guidance"] == {"kind": "input", "default": 2.0, "range": [1.0, 4.0]}
    assert "guidance=W" in (tmp_path / "hub" / "README.md").read_text()
