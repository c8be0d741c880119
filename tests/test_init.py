"""train.init: a new run starting from another model's EMA weights (soflow runs of any method, exports,
pipeline folders, SiT checkpoints), through the real command line in-process."""

import argparse
import os

import pytest
import torch
import yaml

from soflow.cli import main
from soflow.nets import build
from soflow.run.checkpoint import list_checkpoints, read_checkpoint
from soflow.run.init import initial_weights, weights_sha256
from soflow.sit import sit_to_soflow

from helpers import TINY

FM = ["--config", "toy2d", *TINY, "--set", "method=flow_matching", "--set", "train.total_steps=20",
      "--set", "train.checkpoint_every=10", "--set", "train.ema_decay=0.5"]
# lr 1e-12 and EMA decay 1: after one step both networks are still the initial weights (to ~1e-10)
FROZEN = ["--set", "train.total_steps=3", "--set", "train.lr=1.0e-12", "--set", "train.ema_decay=1.0"]


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


@pytest.fixture(scope="module")
def fm_run(tmp_path_factory):
    """A finished flow-matching run on the toy, its export and its pipeline folder."""
    root = tmp_path_factory.mktemp("fm")
    assert main(["train", "--run-dir", str(root / "run"), *FM]) == 0
    assert main(["export", "--checkpoint", str(root / "run"), "--out", str(root / "pipe")]) == 0
    ckpt = read_checkpoint(list_checkpoints(root / "run")[0][1])
    assert not all(torch.equal(ckpt["net"][k], ckpt["ema"][k]) for k in ckpt["ema"])  # online and EMA differ
    return {"root": root, "ema": ckpt["ema"], "net": ckpt["net"], "ckpt": list_checkpoints(root / "run")[0][1],
            "export": next((root / "run" / "exports").glob("*.safetensors"))}


def test_every_source_kind_gives_the_ema_weights(fm_run):
    net = build("mlp", **yaml.safe_load(TINY[1].split("=", 1)[1]), dim=2)
    root = fm_run["root"]
    for source in (root / "run", fm_run["ckpt"], fm_run["export"], root / "pipe"):
        state, kind = initial_weights(source, net)
        assert set(state) == set(fm_run["ema"]), kind
        assert all(torch.equal(state[k], fm_run["ema"][k]) for k in state), kind


@pytest.mark.parametrize("method", ["soflow", "meanflow"])
def test_new_run_starts_from_the_source_ema_at_step_zero(fm_run, tmp_path, method):
    run = tmp_path / "run"
    args = ["train", "--config", "toy2d", *TINY, *FROZEN, "--set", f"method={method}", "--run-dir", str(run),
            "--set", f"train.init={fm_run['root'] / 'run'}", "--stop-after", "1"]
    assert main(args) == 0
    saved = read_checkpoint(list_checkpoints(run)[0][1])
    assert saved["step"] == 1  # the step count starts at 0
    for k, v in fm_run["ema"].items():
        torch.testing.assert_close(saved["ema"][k], v, atol=0, rtol=0)
        torch.testing.assert_close(saved["net"][k], v, atol=1e-8, rtol=0)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["init"] == str(fm_run["root"] / "run")
    assert config["train"]["init_sha256"] == weights_sha256(fm_run["ema"])
    assert "initial weights from" in (run / "log.txt").read_text()
    # Once the run has checkpoints, resume ignores train.init, even a source that is gone.
    args[args.index(f"train.init={fm_run['root'] / 'run'}")] = f"train.init={tmp_path / 'gone'}"
    assert main(args) == 0
    assert read_checkpoint(list_checkpoints(run)[0][1])["step"] == 2
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["init_sha256"] == weights_sha256(fm_run["ema"])


def test_a_different_network_is_one_line_naming_the_tensor(fm_run, tmp_path, capsys):
    code = main(["train", "--config", "toy2d", *TINY, "--set", "model.net_args.hidden=48", "--run-dir",
                 str(tmp_path / "run"), "--set", f"train.init={fm_run['export']}"])
    assert code == 2
    one_line_error(capsys, "train.init", "does not fit this run's network",
                   "time.0.weight is (32, 128) in the file but (48, 128)")
    assert not list_checkpoints(tmp_path / "run")


def test_bad_sources_are_one_line(fm_run, tmp_path, capsys):
    base = ["train", "--config", "toy2d", *TINY, "--run-dir", str(tmp_path / "run")]
    assert main([*base, "--set", f"train.init={tmp_path / 'missing.pt'}", "--dry-run"]) == 2
    one_line_error(capsys, "train.init", "does not exist")
    assert main([*base, "--set", f"train.init={fm_run['export']}", "--set", "train.init_sha256=" + "a" * 64]) == 2
    one_line_error(capsys, "train.init_sha256", "hash to", "the file changed")
    assert main([*base, "--set", "train.init_sha256=abc", "--dry-run"]) == 2
    one_line_error(capsys, "train.init_sha256", "64")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"ema": Payload()}, tmp_path / "evil.pt")
    assert main([*base, "--set", f"train.init={tmp_path / 'evil.pt'}"]) == 2
    one_line_error(capsys, "train.init", "will not unpickle")
    assert not marker.exists()
    torch.save({"something": torch.zeros(2)}, tmp_path / "foreign.pt")
    assert main([*base, "--set", f"train.init={tmp_path / 'foreign.pt'}"]) == 2
    one_line_error(capsys, "train.init", "not a soflow, authors' SoFlow or SiT checkpoint")


def sit_like(net_args: dict) -> dict:
    """A SiT state dict for a DiT: soflow's tensors without the gap embedder, learn_sigma output rows."""
    torch.manual_seed(3)
    state = {k: torch.randn_like(v) * 0.1 for k, v in build("dit-tiny", **net_args).state_dict().items()
             if not k.startswith("s_embedder.")}
    p, c = net_args["patch_size"], net_args["in_channels"]
    w, b = state["final_layer.linear.weight"], state["final_layer.linear.bias"]
    state["final_layer.linear.weight"] = torch.cat([w.reshape(p * p, c, -1), torch.randn_like(w.reshape(p * p, c, -1))],
                                                   1).reshape(2 * p * p * c, -1)
    state["final_layer.linear.bias"] = torch.cat([b.reshape(p * p, c), torch.randn_like(b.reshape(p * p, c))],
                                                 1).reshape(-1)
    return state


def test_sit_checkpoint_starts_a_latent_run(tmp_path):
    pytest.importorskip("h5py")
    from test_reference_runs import write_latents_hdf5

    net_args = dict(patch_size=8, hidden_size=32, depth=1, num_heads=2)
    data = write_latents_hdf5(tmp_path / "latents" / "imagenet_latent.hdf5")
    dit_args = dict(net_args, in_channels=4, input_size=32, num_classes=1000, null_class=True)
    sit = sit_like(dit_args)
    torch.save({"model": sit, "ema": sit, "opt": {}, "args": argparse.Namespace(model="SiT-XL/2")}, tmp_path / "sit.pt")
    run = tmp_path / "run"
    assert main(["train", "--config", "imagenet-dit-xl2-from-sit", "--set", "model.net=dit-tiny",
                 "--set", f"model.net_args={net_args}", "--set", f"data.path={data.parent}", *FROZEN,
                 "--set", "train.batch_size=4", "--set", "train.sample_every=0", "--set", "train.sample_num=4",
                 "--set", "train.device=cpu", "--set", f"train.init={tmp_path / 'sit.pt'}",
                 "--run-dir", str(run), "--stop-after", "1"]) == 0
    saved = read_checkpoint(list_checkpoints(run)[0][1])
    torch.manual_seed(0)
    expected = sit_to_soflow(sit, build("dit-tiny", **dit_args))
    gap_first = [k for k in expected if k.startswith("s_embedder.mlp.0")]
    for k, v in expected.items():
        if k not in gap_first:  # the gap embedder's first layer is the run's own (seeded) init
            torch.testing.assert_close(saved["ema"][k], v, atol=0, rtol=0)
    assert all(torch.count_nonzero(saved["ema"][k]) == 0 for k in ("s_embedder.mlp.2.weight", "s_embedder.mlp.2.bias"))
    assert "SiT checkpoint" in (run / "log.txt").read_text()
