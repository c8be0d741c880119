import pytest
import torch

from conftest import randomize
from soflow import SolutionFlow, sample
from soflow.nets import build
from soflow.sampling import draw_inputs
from soflow.train import EMA


def model(name="mlp", **kw):
    return SolutionFlow(randomize(build(name, **kw), std=0.1), path=kw.pop("path", "linear")).eval()


def test_one_step_is_solution_from_one_to_zero():
    flow = model(num_classes=3)
    x = sample(flow, 5, nfe=1, seed=7)
    noise, labels = draw_inputs((2,), 1, 3, 7, range(5))
    with torch.no_grad():
        assert torch.allclose(x, flow.solution(noise[:, 0], 1.0, 0.0, labels))


def test_renoise_and_chain_two_steps_by_hand():
    flow = SolutionFlow(randomize(build("mlp"), std=0.1), path="trig").eval()
    noise, _ = draw_inputs((2,), 2, 0, 3, range(4))
    with torch.no_grad():
        x0_hat = flow.solution(noise[:, 0], 1.0, 0.0)
        a, b = flow.path.alpha(torch.tensor(0.5)), flow.path.beta(torch.tensor(0.5))
        expect = flow.solution(a * x0_hat + b * noise[:, 1], 0.5, 0.0)
        assert torch.allclose(sample(flow, 4, nfe=2, seed=3, mode="renoise"), expect)
        z = draw_inputs((2,), 1, 0, 3, range(4))[0][:, 0]
        chained = flow.solution(flow.solution(z, 1.0, 0.5), 0.5, 0.0)
        assert torch.allclose(sample(flow, 4, nfe=2, seed=3, mode="chain"), chained)
        assert torch.equal(sample(flow, 4, nfe=2, seed=3), sample(flow, 4, nfe=2, seed=3, mode="chain"))  # the default


@pytest.mark.parametrize("nfe,mode", [(1, "renoise"), (3, "renoise"), (3, "chain")])
def test_same_seed_same_sample_whatever_the_batch(nfe, mode):
    flow = model("dit-tiny", num_classes=4)
    whole = sample(flow, 6, nfe=nfe, seed=11, mode=mode, batch_size=6)
    pieces = sample(flow, 6, nfe=nfe, seed=11, mode=mode, batch_size=4)
    tail = sample(flow, 2, nfe=nfe, seed=11, mode=mode, first_index=4)
    assert torch.allclose(whole, pieces, atol=1e-5) and torch.allclose(whole[4:], tail, atol=1e-5)
    assert not torch.allclose(whole, sample(flow, 6, nfe=nfe, seed=12, mode=mode))


def test_sampling_guidance_extrapolates_network_output():
    flow = model(num_classes=3)
    y = torch.tensor([0, 1, 2, 1])
    z = draw_inputs((2,), 1, 3, 5, range(4))[0][:, 0]
    with torch.no_grad():
        one, zero = torch.ones(4), torch.zeros(4)
        cond, uncond = flow.net(z, one, zero, y), flow.net(z, one, zero, torch.full_like(y, 3))
        expect = flow.solution_from(z, one, zero, uncond + 2.5 * (cond - uncond))
    assert torch.allclose(sample(flow, 4, nfe=1, seed=5, labels=y, guidance=2.5), expect, atol=1e-6)


def test_sampling_bad_arguments():
    flow = model(num_classes=3)
    with pytest.raises(ValueError, match="nfe must be >= 1"):
        sample(flow, 2, nfe=0)
    with pytest.raises(ValueError, match="unknown sampling mode 'euler'"):
        sample(flow, 2, mode="euler")
    with pytest.raises(ValueError, match="labels must be class ids in \\[0, 2\\]"):
        sample(flow, 2, labels=3)


def test_sampling_restores_training_mode():
    flow = model().train()
    sample(flow, 2)
    assert flow.training


def test_ema_per_step_closed_form():
    net = build("mlp", hidden=16, depth=1)
    ema = EMA(net, decay=0.9)
    start = [p.detach().clone() for p in net.parameters()]
    for step in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
        ema.update(net, step)
    # theta_k = theta_0 + k; ema = 0.9^3 theta_0 + 0.1 (0.9^2 (theta_0 + 1) + 0.9 (theta_0 + 2) + (theta_0 + 3))
    for e, p0 in zip(ema.model.parameters(), start):
        expect = p0 + 0.1 * (0.81 * 1 + 0.9 * 2 + 3)
        assert torch.allclose(e, expect, atol=1e-6)


def test_ema_every_k_in_float64():
    net = build("mlp", hidden=16, depth=1)
    ema = EMA(net, decay=0.9999, every=16, float64=True)
    shadow = [p.detach().double().clone() for p in net.parameters()]
    for step in range(40):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        ema.update(net, step)
        if step % 16 == 0:  # after optimizer steps 1, 17, 33
            d = 0.9999 ** 16
            shadow = [(d * s.float().double() + (1 - d) * p.detach().double()) for s, p in zip(shadow, net.parameters())]
    for e, s in zip(ema.model.parameters(), shadow):
        assert torch.equal(e, s.float())


def test_float64_sampling_feeds_float64_times_on_both_paths():
    from soflow.sampling import ode_sample

    flow = model(num_classes=3).double()
    seen = []
    flow.net.register_forward_pre_hook(lambda net, args: seen.append((args[0].dtype, args[1].dtype, args[2].dtype)))
    outs = [sample(flow, 4, nfe=3, seed=2, mode="renoise"), sample(flow, 4, nfe=3, seed=2, mode="chain", guidance=2.0),
            ode_sample(flow, 4, 3, seed=2), ode_sample(flow, 4, 3, method="heun", seed=2, guidance=2.0)]
    assert all(x.dtype == torch.float64 for x in outs)
    assert seen and set(seen) == {(torch.float64,) * 3}  # sample, t and s alike on every call
    # the renoise step at t = 2/3 by hand in float64 (a float32 time would be off by about 1e-8)
    noise, labels = draw_inputs((2,), 3, 3, 2, range(4))
    noise = noise.double()
    with torch.no_grad():
        x = flow.solution(noise[:, 0], 1.0, 0.0, labels)
        for t, z in ((2 / 3, noise[:, 1]), (1 / 3, noise[:, 2])):
            tt = torch.tensor(t, dtype=torch.float64)
            x = flow.solution(flow.path.alpha(tt) * x + flow.path.beta(tt) * z, t, 0.0, labels)
    assert torch.allclose(outs[0], x, rtol=0, atol=1e-12)
