"""MeanFlow's public-implementation settings: the error reduction under the adaptive weight, r != t on
whole steps, and gradient clipping in the training loop."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from soflow import SolutionFlow
from soflow.errors import ConfigError
from soflow.objectives import MeanFlowLoss
from soflow.run.config import load
from soflow.train.loop import train

D = torch.float64


class LinearField(nn.Module):
    """u(z, t, r) = A z + b t + c r + d: its total derivative along (v, 1, 0) is A v + b, by hand."""

    def __init__(self, g):
        super().__init__()
        self.A = nn.Parameter(torch.randn(2, 2, generator=g, dtype=D))
        self.b, self.c, self.d = (nn.Parameter(torch.randn(2, generator=g, dtype=D)) for _ in range(3))

    def forward(self, z, t, r, labels=None, augment_labels=None):
        return z @ self.A.T + t[:, None] * self.b + r[:, None] * self.c + self.d


def hand_loss(field, x0, x1, t, r, p, c, reduce):
    """The MeanFlow loss and its gradient in A, row by row in numpy float64."""
    A, b, cr, d = (w.detach().numpy() for w in (field.A, field.b, field.c, field.d))
    x0, x1, t, r = (a.numpy() for a in (x0, x1, t, r))
    losses, grad_A = [], np.zeros((2, 2))
    for i in range(len(t)):
        z, v = (1 - t[i]) * x0[i] + t[i] * x1[i], x1[i] - x0[i]
        u = A @ z + b * t[i] + cr * r[i] + d
        target = v - (t[i] - r[i]) * (A @ v + b)
        e = u - target
        err = reduce(e * e)
        w = 1 / (err + c) ** p
        losses.append(w * err)
        scale = 1 / len(e) if reduce is np.mean else 1.0
        grad_A += w * 2 * scale * np.outer(e, z) / len(t)  # the target and the weight carry no gradient
    return float(np.mean(losses)), grad_A


@pytest.mark.parametrize("reduction,p", [("mean", 0.5), ("sum", 1.0), ("mean", 1.0), ("sum", 0.5)])
def test_loss_value_and_gradient_written_out_by_hand(reduction, p):
    # c = 0.3: large beside the squared errors, so that sum and mean give visibly different losses even
    # at p = 1 (as c -> 0 the p = 1 loss forgets the error's scale)
    g = torch.Generator().manual_seed(0)
    field = LinearField(g)
    x0, x1 = torch.randn(4, 2, generator=g, dtype=D), torch.randn(4, 2, generator=g, dtype=D)
    t = torch.tensor([0.9, 0.6, 0.35, 0.7], dtype=D)
    r = torch.tensor([0.2, 0.6, 0.1, 0.7], dtype=D)  # two rows r < t, two rows r = t
    loss, _ = MeanFlowLoss(p=p, c=0.3, reduction=reduction).loss_on(SolutionFlow(field), x0, x1, t, r)
    (grad_A,) = torch.autograd.grad(loss, [field.A])
    expect, expect_A = hand_loss(field, x0, x1, t, r, p, 0.3, np.mean if reduction == "mean" else np.sum)
    assert loss.item() == pytest.approx(expect, rel=1e-12)
    np.testing.assert_allclose(grad_A.numpy(), expect_A, rtol=1e-10)
    # the other reduction is a different loss here (the comparison above can tell them apart)
    other, other_A = hand_loss(field, x0, x1, t, r, p, 0.3, np.sum if reduction == "mean" else np.mean)
    assert abs(other - expect) > 0.01 * abs(expect)
    assert np.abs(other_A - expect_A).max() > 0.01 * np.abs(expect_A).max()


# ---------------------------------------------------------------- r != t on whole steps


def test_step_split_moves_the_whole_batch_on_a_share_of_the_steps():
    for ratio in (0.25, 0.5):
        loss = MeanFlowLoss(ratio_r_neq_t=ratio, r_neq_t_split="steps", seed=3)
        moving = []
        for step in range(2000):
            t, r = loss.sample_times(8, step=step)
            assert bool((r == t).all()) or bool((r < t).all())  # never a mix within a batch
            moving.append(bool((r < t).all()))
        # binomial(2000, ratio): 5 standard deviations is below 0.05
        assert abs(np.mean(moving) - ratio) < 0.05, (ratio, np.mean(moving))
    every, never = MeanFlowLoss(ratio_r_neq_t=1.0, r_neq_t_split="steps"), MeanFlowLoss(ratio_r_neq_t=0.0,
                                                                                       r_neq_t_split="steps")
    assert all(every.moving_step(k) for k in range(100)) and not any(never.moving_step(k) for k in range(100))


def test_step_split_depends_on_seed_and_step_only():
    a, b = MeanFlowLoss(r_neq_t_split="steps", ratio_r_neq_t=0.5, seed=1), MeanFlowLoss(r_neq_t_split="steps",
                                                                                       ratio_r_neq_t=0.5, seed=1)
    torch.manual_seed(0)
    first = [a.moving_step(k) for k in range(64)]
    torch.manual_seed(123)
    torch.rand(17)
    assert [b.moving_step(k) for k in reversed(range(64))][::-1] == first  # global RNG and call order play no part
    other_seed = MeanFlowLoss(r_neq_t_split="steps", ratio_r_neq_t=0.5, seed=2)
    assert [other_seed.moving_step(k) for k in range(64)] != first


def test_step_split_in_a_run_config_follows_train_seed():
    cfg = load("toy2d", ["method=meanflow", "meanflow.r_neq_t_split=steps", "train.seed=7"])
    assert cfg.meanflow.seed == 7 and cfg.meanflow.r_neq_t_split == "steps"
    assert "seed" not in cfg.to_dict()["meanflow"]
    with pytest.raises(ConfigError, match="meanflow.seed: follows train.seed"):
        load("toy2d", ["meanflow.seed=3"])
    with pytest.raises(ConfigError, match="meanflow.r_neq_t_split"):
        load("toy2d", ["meanflow.r_neq_t_split=columns"])
    # the row split stays the default: the first quarter of the rows keeps r < t on every step
    t, r = load("toy2d", ["method=meanflow"]).meanflow.sample_times(8, step=5)
    assert bool((r[:2] < t[:2]).all()) and bool((r[2:] == t[2:]).all())


# ---------------------------------------------------------------- train.grad_clip

TINY_RUN = ["model.net_args={hidden: 16, depth: 1}", "train.batch_size=32", "train.total_steps=1",
            "train.log_every=1", "train.checkpoint_every=1", "train.sample_num=50", "train.sample_nfe=[1]",
            "train.optimizer=radam", "train.lr=0.01"]


def last_step(run_dir, *extra):
    """(parameters before, gradients entering the optimizer, parameters after) of the last step of a toy run."""
    seen = {}

    def before_step(optimizer, args, kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        seen["before"] = [p.detach().clone() for p in params]
        seen["grads"] = [p.grad.detach().clone() for p in params]

    def after_step(step, flow):
        seen["after"] = [p.detach().clone() for p in flow.net.parameters()]

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        train(load("toy2d", [*TINY_RUN, *extra]), run_dir, on_step=after_step)
    finally:
        handle.remove()
    return seen["before"], seen["grads"], seen["after"]


def test_grad_clip_step_equals_a_manual_clipped_step(tmp_path):
    # RAdam's first step is p - lr g (no adaptive scaling yet), so the update shows the gradient's size
    before, raw, after_raw = last_step(tmp_path / "plain")
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in raw)).item()
    clip = 0.3 * norm
    before_c, grads, after = last_step(tmp_path / "clipped", f"train.grad_clip={clip}")
    for p, q in zip(before, before_c):
        assert torch.equal(p, q)  # the same start and (below) the same raw gradient
    for g, g_raw in zip(grads, raw):
        torch.testing.assert_close(g, g_raw * (clip / norm), rtol=1e-5, atol=1e-8)
    for p, g_raw, new in zip(before, raw, after):
        torch.testing.assert_close(new, p - 0.01 * g_raw * (clip / norm), rtol=1e-5, atol=1e-7)
    # unclipped, the same step is the plain gradient step, which differs
    for p, g_raw, new in zip(before, raw, after_raw):
        torch.testing.assert_close(new, p - 0.01 * g_raw, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(a, b) for a, b in zip(after, after_raw))


def test_grad_clip_above_the_norm_changes_nothing(tmp_path):
    _, raw, after_raw = last_step(tmp_path / "plain")
    _, grads, after = last_step(tmp_path / "loose", "train.grad_clip=1000000.0")
    assert all(torch.equal(a, b) for a, b in zip(grads, raw)) and all(torch.equal(a, b) for a, b in zip(after, after_raw))


@pytest.mark.parametrize("value", ["0", "-1"])
def test_grad_clip_must_be_positive(value):
    with pytest.raises(ConfigError, match="train.grad_clip: must be a positive norm"):
        load("toy2d", [f"train.grad_clip={value}"])


def test_step_split_run_resumed_midway_equals_the_straight_run(tmp_path):
    # the loss is told the run's absolute step: a resumed run draws the same r != t steps
    cfg = ["method=meanflow", "meanflow.r_neq_t_split=steps", "meanflow.ratio_r_neq_t=0.5", "train.seed=4",
           *TINY_RUN, "train.total_steps=8", "train.checkpoint_every=100"]
    straight = last_step(tmp_path / "straight", *cfg)[2]
    train(load("toy2d", cfg), tmp_path / "sliced", stop_after=3)
    resumed = last_step(tmp_path / "sliced", *cfg)[2]
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    moving = [MeanFlowLoss(r_neq_t_split="steps", ratio_r_neq_t=0.5, seed=4).moving_step(k) for k in range(8)]
    assert any(moving[:3]) and any(moving[3:]) and not all(moving)  # both kinds of step before and after the cut
    assert moving[3:] != moving[:5]  # counting steps from the resume would have drawn other ones
