"""Shortcut models, the method added through one module and one registry line."""

import math

import pytest
import torch

from conftest import randomize
from helpers import TINY, assert_one_line_error, soflow_inproc
from soflow import SolutionFlow
from soflow.eval import energy_distance
from soflow.methods import method
from soflow.nets import build
from soflow.objectives import ShortcutLoss


def test_step_sizes_are_dyadic_and_both_steps_stay_inside_the_interval():
    t, d = ShortcutLoss(max_steps=16).sample_steps(20_000)
    levels = -torch.log2(d.double())
    assert torch.equal(levels, levels.round()) and set(levels.long().tolist()) == {1, 2, 3, 4}
    assert bool((t <= 1).all()) and bool((t - 2 * d >= -1e-7).all())
    assert torch.allclose(t / d, (t / d).round(), atol=1e-4)  # t on the grid of d
    counts = torch.bincount(levels.long())[1:].double()
    assert bool(((counts / counts.sum() - 0.25).abs() < 0.02).all())  # levels drawn uniformly


def test_loss_equals_the_paper_formula_in_velocity_form():
    """Euler parameterization: f(x, t, s) = x + (s - t) F, so the paper's shortcut s(x, t, d) is
    F(x, t, t - d); its self-consistency target is the mean of two half-size shortcuts
    (F(x_t, t, t - d) + F(x', t - d, t - 2d)) / 2 with x' = x_t - d F(x_t, t, t - d)."""
    torch.manual_seed(1)
    net = randomize(build("mlp", dim=2, hidden=16, depth=2).double())
    flow = SolutionFlow(net)
    x0, x1 = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    t_v = torch.tensor([0.3, 0.9], dtype=torch.float64)
    t_c = torch.tensor([1.0, 0.5, 0.75, 0.25], dtype=torch.float64)
    d = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    loss, stats = ShortcutLoss().loss_on(flow, x0, x1, t_v, t_c, d)

    F = lambda x, t, s: net(x, t, s, None, None)  # noqa: E731
    x_t = (1 - torch.cat([t_v, t_c]))[:, None] * x0 + torch.cat([t_v, t_c])[:, None] * x1
    fm = ((F(x_t[:2], t_v, t_v) - (x1[:2] - x0[:2])) ** 2).mean(1)
    xc = x_t[2:]
    f1 = F(xc, t_c, t_c - d)
    f2 = F(xc - d[:, None] * f1, t_c - d, t_c - 2 * d)
    cons = ((F(xc, t_c, t_c - 2 * d) - (f1 + f2) / 2) ** 2).mean(1)
    assert torch.allclose(loss, torch.cat([fm, cons]).sum() / 6, rtol=1e-12, atol=0)
    assert torch.allclose(stats["consistency_mse"], cons.mean(), rtol=1e-12, atol=0)


def test_the_gradient_flows_only_through_the_prediction():
    net = randomize(build("mlp", dim=2, hidden=16, depth=1))
    flow = SolutionFlow(net)
    loss, _ = ShortcutLoss(consistency_ratio=1.0).loss_on(
        flow, torch.randn(4, 2), torch.randn(4, 2), torch.zeros(0), torch.ones(4), torch.full((4,), 0.5))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("bad, needle", [({"max_steps": 12}, "max_steps: must be a power of 2"),
                                         ({"consistency_ratio": 1.5}, "consistency_ratio: must lie in [0, 1]")])
def test_bad_settings_name_the_field(bad, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        ShortcutLoss(**bad)


def test_trains_and_samples_through_the_command_line(tmp_path):
    run = tmp_path / "run"
    soflow_inproc("train", "--config", "toy2d", "--run-dir", run, *TINY, "--set", "method=shortcut",
                  "--set", "shortcut.max_steps=8", "--set", "train.total_steps=300", "--set", "train.lr=0.003",
                  check=True)
    out = tmp_path / "x.npy"
    soflow_inproc("sample", "--checkpoint", run, "--num", "1000", "--nfe", "1", "--out", out, check=True)
    import numpy as np

    from soflow.data import make_dataset
    from soflow.run.config import load

    ref = make_dataset(load("toy2d").data).reference(1000)
    trained = energy_distance(torch.from_numpy(np.load(out)), ref)
    noise = energy_distance(torch.randn(1000, 2), ref)
    assert trained < 0.5 * noise, (trained, noise)  # 300 steps already move the noise towards the data
    proc = soflow_inproc("sample", "--checkpoint", run, "--num", "4", "--mode", "renoise", "--out", tmp_path / "y.npy")
    assert_one_line_error(proc, "--mode renoise: method shortcut samples with chain")
    assert method("shortcut").modes == ("chain",) and math.isfinite(trained)
