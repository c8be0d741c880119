"""Continuing the reference trainer's runs: `convert-reference` with the optimizer state, the
reference YAML's checkpoint cadence, and refusal of guidance settings whose meaning differs.

The reference checkpoints are written here in the reference trainer's own format: a module that
holds the network as `network`, its AdamW/RAdam over `network.parameters()` after a few real
steps, and `torch.save` of {'model', 'ema_model', 'optimizer', 'finished_steps', 'finished_epochs'}.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import randomize
from helpers import DATA, assert_one_line_error, soflow_inproc
from soflow.nets import build
from soflow.reference import CheckpointError, convert_reference_run
from soflow.run.checkpoint import list_checkpoints, read_checkpoint
from soflow.run.config import ConfigError, load
from soflow.run.presets import preset_names
from soflow.train.loop import train
from test_data import write_cifar

REFERENCE_STEPS = 3
LR = 1e-3

# Two tiny versions of the reference setups: guided DiT on SD-VAE latents with AdamW, and the
# unconditional U-Net on CIFAR-10 with RAdam and augment labels.
SETUPS = {
    "dit-adamw": dict(
        net="dit-tiny", net_args=dict(patch_size=8, hidden_size=32, depth=1, num_heads=2),
        build_args=dict(in_channels=4, input_size=32, num_classes=1000, null_class=True),
        optimizer=torch.optim.AdamW, betas=[0.9, 0.99], data="imagenet-latents",
        objective=dict(velocity_loss_ratio=0.75, cfg_scale=3.0, mix_ratio=0.25, cfg_drop_rate=0.1,
                       cfg_decay_time=0.8)),
    "unet-radam": dict(
        net="unet-cifar10", net_args=dict(model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[]),
        build_args=dict(augment_dim=6), optimizer=torch.optim.RAdam, betas=[0.9, 0.999], data="cifar10",
        objective=dict(velocity_loss_ratio=0.0, p=0.75, eps=0.001)),
}


class ReferenceModel(nn.Module):
    """The reference trainer's model: the network lives under the name `network`."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network


def tiny_net(setup: dict) -> nn.Module:
    return build(setup["net"], **setup["build_args"], **setup["net_args"])


def net_inputs(net: nn.Module, setup: dict, g: torch.Generator, b: int = 4):
    x = torch.randn(b, *net.sample_shape, generator=g)
    t = torch.rand(b, generator=g)
    s = t * torch.rand(b, generator=g)
    if setup["data"] == "imagenet-latents":
        return x, t, s, torch.randint(1001, (b,), generator=g), None
    return x, t, s, None, torch.randn(b, 6, generator=g)


def write_reference_checkpoint(path: Path, setup: dict, lr: float = LR) -> dict:
    """Train a tiny network for a few real optimizer steps the way the reference trainer sets up
    its optimizer, and save it in the reference checkpoint format."""
    model = ReferenceModel(randomize(tiny_net(setup), std=0.05))
    ema = copy.deepcopy(model)
    optimizer = setup["optimizer"](model.network.parameters(), lr=lr, betas=tuple(setup["betas"]), weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(REFERENCE_STEPS):
        x, t, s, y, aug = net_inputs(model.network, setup, g)
        loss = (model.network(x, t, s, y, aug) - torch.randn(x.shape, generator=g)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.mul_(0.9).add_(p, alpha=0.1)
    blob = {"model": model.state_dict(), "ema_model": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "finished_steps": REFERENCE_STEPS, "finished_epochs": 0}
    torch.save(blob, path)
    return blob


def write_latents_hdf5(path: Path, n: int = 16) -> Path:
    """The reference `imagenet_latent.hdf5` layout: latents = [mean, std] along channels."""
    rng = np.random.default_rng(0)
    latents = np.concatenate([rng.normal(size=(n, 4, 32, 32)), rng.uniform(0.1, 0.5, (n, 4, 32, 32))], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["latents"] = latents.astype(np.float32)
        f["labels"] = rng.integers(0, 1000, n)
        f["amount"] = n
        f["latent_size"] = 32
    return path


def write_config(path: Path, setup: dict, data_path: Path, optimizer: str | None = None, lr: float = LR) -> Path:
    """A soflow config for the tiny network, with the reference recipe of its dataset."""
    cifar = setup["data"] == "cifar10"
    cfg = {
        "method": "soflow",
        "model": {"net": setup["net"], "net_args": setup["net_args"]},
        "objective": setup["objective"],
        "data": {"name": setup["data"], "path": str(data_path), "conditional": not cifar,
                 "augment_p": 0.12 if cifar else 0.0},
        "train": {"total_steps": 100, "batch_size": 8, "optimizer": optimizer or setup["optimizer"].__name__.lower(),
                  "lr": lr, "betas": setup["betas"], "checkpoint_every": 1000, "log_every": 1, "sample_nfe": [1],
                  "sample_every": 0, "device": "cpu", "ema_every": 16 if cifar else 1, "ema_float64": cifar},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def prepare(tmp_path: Path, name: str, **config_kw):
    setup = SETUPS[name]
    blob = write_reference_checkpoint(tmp_path / "reference.pt", setup)
    data = write_latents_hdf5(tmp_path / "latents" / "imagenet_latent.hdf5") if setup["data"] == "imagenet-latents" \
        else write_cifar(tmp_path / "cifar", n=4)
    config = write_config(tmp_path / "config.yaml", setup, data, **config_kw)
    return setup, blob, config


class StepRecorder:
    """The gradients and optimizer state every optimizer step sees, through torch's global
    step pre-hook (the real optimizer of the training loop, nothing replaced)."""

    def __init__(self):
        self.steps = []

    def __enter__(self):
        self.handle = register_optimizer_step_pre_hook(self._record)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def _record(self, optimizer, args, kwargs):
        params = optimizer.param_groups[0]["params"]
        self.steps.append({
            "grads": [None if p.grad is None else p.grad.detach().clone() for p in params],
            "state": [{k: v.clone() for k, v in optimizer.state[p].items()} if p in optimizer.state else {}
                      for p in params]})


def reference_step(setup: dict, blob: dict, grads: list, moments: bool) -> dict:
    """One plain-torch optimizer step from the reference weights with the given gradients, with
    the reference optimizer state loaded (moments=True) or a fresh optimizer."""
    model = ReferenceModel(tiny_net(setup))
    model.load_state_dict(blob["model"])
    optimizer = setup["optimizer"](model.network.parameters(), lr=LR, betas=tuple(setup["betas"]), weight_decay=0.0)
    if moments:
        optimizer.load_state_dict(copy.deepcopy(blob["optimizer"]))  # step() updates the moments in place
    for p, g in zip(model.network.parameters(), grads):
        p.grad = g
    optimizer.step()
    return {k: v.detach() for k, v in model.network.state_dict().items()}


def max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_converted_run_continues_with_the_reference_optimizer_state(tmp_path, name):
    setup, blob, config = prepare(tmp_path, name)
    run = tmp_path / "run"
    soflow_inproc("convert-reference", "--checkpoint", tmp_path / "reference.pt", "--config", config, "--out", run,
                  check=True)
    converted = read_checkpoint(list_checkpoints(run)[0][1])
    assert converted["step"] == REFERENCE_STEPS
    assert len(converted["optimizer"]["state"]) == len(blob["optimizer"]["state"]) > 0

    cfg = load(base=yaml.safe_load((run / "config.yaml").read_text()))
    with StepRecorder() as recorder:
        result = train(cfg, run, stop_after=1)
    assert result["step"] == REFERENCE_STEPS + 1 and len(recorder.steps) == 1
    seen = recorder.steps[0]

    # The optimizer the loop stepped held the reference moments and step counts.
    names = [n for n, _ in tiny_net(setup).named_parameters()]
    reference_state = blob["optimizer"]["state"]
    for i, name_i in enumerate(names):
        if i in reference_state:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(seen["state"][i][key], reference_state[i][key]), f"{key} of {name_i}"
        else:  # a frozen parameter (the DiT positional embedding) never has a gradient
            assert seen["state"][i] == {} and seen["grads"][i] is None

    after = read_checkpoint(list_checkpoints(run)[0][1])
    assert after["step"] == REFERENCE_STEPS + 1
    assert all(int(s["step"]) == REFERENCE_STEPS + 1 for s in after["optimizer"]["state"].values())
    with_moments = reference_step(setup, blob, seen["grads"], moments=True)
    fresh = reference_step(setup, blob, seen["grads"], moments=False)
    net = after["net"]
    assert max_difference(with_moments, net) < 1e-7
    assert max_difference(fresh, net) > 1e-6  # a fresh optimizer takes another step (RAdam: 3e-5, AdamW: 2e-3)


def test_converted_run_resumes_under_fsdp_with_the_moments(tmp_path):
    setup, blob, config = prepare(tmp_path, "dit-adamw")
    run = convert_reference_run(tmp_path / "reference.pt", config, tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "soflow", "train", "--run-dir", str(run), "--stop-after", "1",
                           "--set", "train.fsdp=true"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = read_checkpoint(list_checkpoints(run)[0][1])
    assert after["step"] == REFERENCE_STEPS + 1
    names = [n for n, _ in tiny_net(setup).named_parameters()]
    beta2 = setup["betas"][1]
    for i, state in blob["optimizer"]["state"].items():
        mine = after["optimizer"]["state"][names[i]]
        assert int(mine["step"]) == REFERENCE_STEPS + 1, names[i]
        # v' = b2 v + (1 - b2) g^2 >= b2 v holds only if the reference v was loaded
        assert (mine["exp_avg_sq"] >= beta2 * state["exp_avg_sq"] * (1 - 1e-6)).all(), names[i]


def tamper(path: Path, change) -> None:
    blob = torch.load(path, weights_only=True)
    change(blob["optimizer"])
    torch.save(blob, path)


def test_optimizer_state_that_does_not_fit_is_one_line_naming_the_file(tmp_path):
    setup, blob, config = prepare(tmp_path, "dit-adamw")
    ckpt = tmp_path / "reference.pt"
    first = next(iter(blob["optimizer"]["state"]))
    name = [n for n, _ in tiny_net(setup).named_parameters()][first]

    def shrink(opt):
        opt["state"][first]["exp_avg"] = opt["state"][first]["exp_avg"][:1]

    tamper(ckpt, shrink)
    proc = soflow_inproc("convert-reference", "--checkpoint", ckpt, "--config", config, "--out", tmp_path / "run")
    assert_one_line_error(proc, str(ckpt), f"exp_avg of {name} has shape")
    assert not (tmp_path / "run").exists()

    cases = [
        (lambda o: o["param_groups"][0]["params"].pop(), "covers"),
        (lambda o: o.pop("param_groups"), "not a torch optimizer state_dict"),
        (lambda o: o["state"][first].pop("exp_avg_sq"), f"optimizer state of {name} has"),
        (lambda o: o["state"].pop(first), f"no moments for {name}; it does not belong to this DiT"),
        (lambda o: o["param_groups"][0].update(eps=1e-6), "optimizer eps 1e-06 differs from soflow's 1e-08"),
    ]
    for change, needle in cases:
        write_reference_checkpoint(ckpt, setup)
        tamper(ckpt, change)
        with pytest.raises(CheckpointError, match=needle) as e:
            convert_reference_run(ckpt, config, tmp_path / "run")
        assert str(ckpt) in str(e.value) and "\n" not in str(e.value)


def test_optimizer_hyperparameters_must_match_the_config(tmp_path):
    setup, _, _ = prepare(tmp_path, "dit-adamw")
    ckpt, data = tmp_path / "reference.pt", tmp_path / "latents" / "imagenet_latent.hdf5"
    other_lr = write_config(tmp_path / "lr.yaml", setup, data, lr=2e-4)
    with pytest.raises(CheckpointError, match=r"optimizer lr 0.001 differs .*set train.lr"):
        convert_reference_run(ckpt, other_lr, tmp_path / "run")
    radam = write_config(tmp_path / "radam.yaml", setup, data, optimizer="radam")
    with pytest.raises(CheckpointError, match=r"Adam\(W\)'s but train.optimizer is radam; set train.optimizer=adamw"):
        convert_reference_run(ckpt, radam, tmp_path / "run")


def test_reference_checkpoint_before_the_first_step_converts_to_a_fresh_optimizer(tmp_path):
    setup, blob, config = prepare(tmp_path, "dit-adamw")
    ckpt = tmp_path / "reference.pt"
    tamper(ckpt, lambda o: o["state"].clear())  # the reference's 0.pt: param groups, no state yet
    run = convert_reference_run(ckpt, config, tmp_path / "run")
    assert read_checkpoint(list_checkpoints(run)[0][1])["optimizer"] == {}
    other_lr = write_config(tmp_path / "lr.yaml", setup, tmp_path / "latents" / "imagenet_latent.hdf5", lr=2e-4)
    with pytest.raises(CheckpointError, match="optimizer lr 0.001 differs"):  # its param group is still checked
        convert_reference_run(ckpt, other_lr, tmp_path / "run2")


# ---------------------------------------------------------------- the reference YAML

def test_reference_yamls_load_with_their_checkpoint_cadence_and_presets_still_load():
    for name in ("reference_imagenet.yaml", "reference_cifar.yaml"):
        cfg = load(str(DATA / name))
        assert cfg.train.checkpoint_every == cfg.train.keep_every == 25_000
    for name in preset_names():  # none of them uses a refused guidance setting
        load(name)


def reference_yaml(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((DATA / "reference_imagenet.yaml").read_text())
    data.update(changes)
    path = tmp_path / "imagenet.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_reference_dataset_folder_trains_a_step(tmp_path):
    """The reference YAML's dataset_path is the folder that holds imagenet_latent.hdf5."""
    folder = write_latents_hdf5(tmp_path / "imagenet_latent" / "imagenet_latent.hdf5").parent
    config = reference_yaml(tmp_path, dataset_path=str(folder))
    tiny = ["model.net=dit-tiny", "model.net_args={patch_size: 8, hidden_size: 32, depth: 1, num_heads: 2}",
            "train.batch_size=4", "train.sample_nfe=[1]", "train.device=cpu", "data.num_workers=0"]
    cfg = load(str(config), tiny)
    assert cfg.data.path == str(folder)
    train(cfg, tmp_path / "run", stop_after=1)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [1]


# ---------------------------------------------------------------- guidance settings

LABELLED = ["data.name=imagefolder", "model.net=dit-tiny", "model.net_args={}"]


@pytest.mark.parametrize("overrides,needles", [
    (["objective.cfg_scale=0.5", "objective.cfg_drop_rate=0.1"],
     ["objective.cfg_scale=0.5", "set objective.cfg_scale=1"]),
    (["objective.mix_ratio=0.5"], ["objective.mix_ratio=0.5 with objective.cfg_scale=1", "set objective.mix_ratio=1"]),
    (["objective.cfg_drop_rate=0.1"],
     ["objective.cfg_drop_rate=0.1 with objective.cfg_scale=1", "set objective.cfg_drop_rate=0"]),
    (["objective.cfg_scale=2"], ["objective.cfg_scale=2.0 with objective.cfg_drop_rate=0",
                                 "set objective.cfg_drop_rate above 0"]),
])
def test_guidance_settings_that_diverge_are_refused(overrides, needles):
    with pytest.raises(ConfigError) as e:
        load("toy2d", [*LABELLED, *overrides])
    message = str(e.value)
    assert "\n" not in message and all(n in message for n in needles), message


@pytest.mark.parametrize("source,overrides,needle", [
    ("toy2d", ["objective.cfg_scale=2", "objective.cfg_drop_rate=0.1"], "data.name=checkerboard gives none"),
    ("fmnist", ["data.conditional=false"], "or data.conditional=true"),
    ("cifar10-unet", ["objective.mix_ratio=0.5"], "objective.mix_ratio=0.5: training-time guidance needs class labels"),
])
def test_guidance_on_unlabelled_data_is_refused(source, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load(source, overrides)


def test_reference_yaml_guidance_the_reference_refuses(tmp_path):
    with pytest.raises(ConfigError, match="objective.cfg_drop_rate=0.1 with objective.cfg_scale=1"):
        load(str(reference_yaml(tmp_path, cfg_scale=1.0, mix_ratio=1.0)))
    with pytest.raises(ConfigError, match="objective.cfg_scale=3.0 with objective.cfg_drop_rate=0"):
        load(str(reference_yaml(tmp_path, cfg_drop_rate=0.0)))


def test_refused_setting_still_opens_as_a_trained_run_and_leaves_other_methods_alone():
    with pytest.raises(ConfigError, match="objective.cfg_drop_rate=0.1 with objective.cfg_scale=1"):
        load("toy2d", [*LABELLED, "objective.cfg_drop_rate=0.1"])
    cfg = load("toy2d", LABELLED).to_dict()
    cfg["objective"].update(cfg_drop_rate=0.1)
    assert load(base=cfg).objective.cfg_drop_rate == 0.1  # a saved run config opens for sampling
    load("toy2d", [*LABELLED, "method=flow_matching", "objective.cfg_drop_rate=0.1"])


def test_guidance_refusal_through_the_cli_dry_run(tmp_path):
    proc = soflow_inproc("train", "--config", "fmnist", "--run-dir", tmp_path / "run", "--set", "objective.cfg_scale=1",
                         "--dry-run")
    assert_one_line_error(proc, "objective.mix_ratio=0.5 with objective.cfg_scale=1", "set objective.mix_ratio=1")
    assert not (tmp_path / "run").exists()


def test_guidance_with_fewer_flow_matching_rows_than_consistency_rows():
    """velocity_loss_ratio < 0.5 with guidance: the unconditional forward asks for the null class on
    every row of both groups."""
    from soflow.objectives import SoFlowLoss
    from soflow.solution import SolutionFlow

    net = build("dit-tiny", num_classes=5, null_class=True)
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append((torch.is_grad_enabled(), i[3].clone())))
    loss, _ = SoFlowLoss(velocity_loss_ratio=0.25, cfg_scale=2.0, cfg_drop_rate=0.1)(
        SolutionFlow(net), torch.randn(8, 4, 16, 16), torch.randint(5, (8,)))
    loss.backward()
    assert [(grad, len(y)) for grad, y in calls] == [(True, 8), (False, 8), (False, 6)]
    assert torch.equal(calls[1][1], torch.full((8,), 5))
