"""SiT checkpoints as soflow DiTs: exact against golden values of SiT's own code (tests/fixtures/sit)."""

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from soflow import SolutionFlow
from soflow.errors import CheckpointError
from soflow.nets import build
from soflow.nets.dit import timestep_embedding
from soflow.objectives import SoFlowLoss
from soflow.reference import load_sit_network
from soflow.nets.registry import load_into
from soflow.sit import read_sit_state, sit_dit_args, sit_to_soflow, time_reversal

FIXTURES = Path(__file__).parent / "fixtures" / "sit"
TINY_ARGS = json.loads((FIXTURES / "tiny.json").read_text())


@pytest.fixture(scope="module")
def sit_files(tmp_path_factory):
    """The tiny SiT in both file kinds SiT writes: the released bare state dict and train.py's dict."""
    state = load_file(FIXTURES / "tiny.safetensors")
    folder = tmp_path_factory.mktemp("sit")
    torch.save(state, folder / "bare.pt")
    args = argparse.Namespace(model="SiT-XL/2", image_size=256, global_batch_size=256, lr=1e-4)
    torch.save({"model": {k: torch.zeros_like(v) for k, v in state.items()}, "ema": state, "opt": {}, "args": args},
               folder / "train.pt")
    return {"bare": folder / "bare.pt", "train": folder / "train.pt"}


@pytest.mark.parametrize("kind", ["bare", "train"])
def test_velocity_is_minus_sit_at_reversed_time(sit_files, kind):
    """(S1): F(x, t, t, y) = -SiT(x, 1 - t, y) to float rounding; train.py files give their EMA."""
    case = load_file(FIXTURES / "tiny-case.safetensors")
    net = load_sit_network(sit_files[kind], num_heads=TINY_ARGS["num_heads"]).eval()
    t = 1 - case["t"]
    with torch.no_grad():
        out = net(case["x"], t, t, case["y"])
        gap = net(case["x"], t, t * 0.3, case["y"])  # the gap embedder adds exactly zero at the start
    scale = case["out"].abs().max()
    assert scale > 0.5
    torch.testing.assert_close(out, -case["out"], atol=2e-6 * scale, rtol=0)
    assert torch.equal(gap, out)
    assert (case["y"] == TINY_ARGS["num_classes"]).any()  # the null class row is used too


def test_time_reversal_is_exact_in_float64():
    """(S2): e(1 - t) = M e(t) for the sinusoidal features, in float64."""
    t = torch.rand(64, dtype=torch.float64)
    m = time_reversal(256, dtype=torch.float64)
    torch.testing.assert_close(timestep_embedding(1 - t, 256), timestep_embedding(t, 256) @ m.T, atol=1e-12, rtol=0)


def test_xl2_layout_is_dit_xl2_name_by_name():
    """Every tensor of the released SiT-XL/2 has the name and shape of soflow's dit-xl2, except the
    output layer (twice the rows: learn_sigma) and the gap embedder that SiT lacks."""
    layout = {k: tuple(v) for k, v in json.loads((FIXTURES / "layout-SiT-XL-2.json").read_text()).items()}
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in build("dit-xl2").state_dict().items()}
    assert set(ours) - set(layout) == {f"s_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert set(layout) <= set(ours)
    for name, shape in layout.items():
        if name.startswith("final_layer.linear."):
            assert shape == (2 * ours[name][0], *ours[name][1:]), name
        else:
            assert shape == ours[name], name
    meta = {k: torch.empty(v, device="meta") for k, v in layout.items()}
    with torch.device("meta"):  # the whole conversion, shapes only: every converted tensor fits dit-xl2
        load_into(build("dit-xl2"), sit_to_soflow(meta, build("dit-xl2")), source="SiT-XL/2 layout")
    assert sit_dit_args(meta) == dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                                      mlp_ratio=4.0, num_classes=1000, null_class=True)


def test_gap_embedding_learns_from_the_first_step(sit_files):
    """A zero last layer with a random first layer: zero output, non-zero gradient after one SoFlow step."""
    flow = SolutionFlow(load_sit_network(sit_files["bare"], num_heads=4))
    loss_fn = SoFlowLoss(cfg_scale=2.0, mix_ratio=0.5, cfg_drop_rate=0.1, total_steps=100)
    g = torch.Generator().manual_seed(0)
    x0, labels = torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    loss, _ = loss_fn(flow, x0, labels, step=0)
    loss.backward()
    last = flow.net.s_embedder.mlp[2]
    assert torch.count_nonzero(last.weight) == 0 and torch.count_nonzero(last.bias) == 0
    assert last.weight.grad.abs().sum() > 0 and last.bias.grad.abs().sum() > 0
    assert flow.net.s_embedder.mlp[0].weight.abs().sum() > 0


def test_named_size_and_overrides(sit_files):
    with pytest.raises(CheckpointError, match="num_heads"):
        load_sit_network(sit_files["bare"])
    with pytest.raises(CheckpointError, match="unknown SiT size 'SiT-Q/3'"):
        load_sit_network(sit_files["bare"], name="SiT-Q/3")
    # a named size whose shapes differ from the file: one line naming tensors
    with pytest.raises(CheckpointError, match="does not fit DiT"):
        load_sit_network(sit_files["bare"], name="SiT-S/2")
    net = load_sit_network(sit_files["bare"], name="SiT-S/2", **{k: v for k, v in TINY_ARGS.items()
                                                                 if k not in ("class_dropout_prob", "learn_sigma")})
    assert net.num_classes == 10 and len(net.blocks) == 2


def test_foreign_files_are_one_line_and_payloads_stay_inert(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"ema": {}, "args": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a readable SiT checkpoint"):
        read_sit_state(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a SiT checkpoint"):
        read_sit_state(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no such SiT checkpoint"):
        read_sit_state(tmp_path / "missing.pt")
