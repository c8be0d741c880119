import json

import pytest
import torch

from conftest import randomize, reference_dir
from soflow.nets import build
from soflow.reference import CheckpointError, load_into, load_reference_network, strip_prefix

PAPER_PARAMETERS = {"dit-b4": 131_214_400, "dit-b2": 131_288_080, "dit-m2": 308_281_360,
                    "dit-l2": 459_399_184, "dit-xl2": 676_735_504, "unet-cifar10": 55_932_419}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMETERS))
def test_full_size_parameter_counts(name):
    with torch.device("meta"):
        net = build(name)
    assert sum(p.numel() for p in net.parameters()) == PAPER_PARAMETERS[name]


def layouts():
    return json.loads((reference_dir() / "state_dict_layouts.json").read_text())


@pytest.mark.parametrize("model_type", ["DiT-B-4", "DiT-B-2", "DiT-M-2", "DiT-L-2", "DiT-XL-2", "UNet"])
def test_reference_state_dict_layouts_convert(model_type):
    """Every name and shape of the full-size reference layouts maps onto our networks (meta device)."""
    layout = layouts()[model_type]
    state = {k: torch.empty(shape, device="meta") for k, shape in layout["state_dict"].items()}
    with torch.device("meta"):
        net = build(model_type)
    load_into(net, strip_prefix(state))
    assert sum(p.numel() for p in net.parameters()) == layout["parameters"]


def test_converter_rejects_foreign_and_corrupt_checkpoints(tmp_path):
    net = build("dit-tiny", num_classes=10)
    good = {"network." + k: v for k, v in net.state_dict().items()}
    path = tmp_path / "ref.pt"
    torch.save({"model": good, "ema_model": good, "optimizer": {}, "finished_steps": 3, "finished_epochs": 0}, path)
    loaded = load_reference_network(path, "dit-tiny", num_classes=10)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))

    with pytest.raises(CheckpointError, match="does not fit DiT.*shape"):
        load_reference_network(path, "dit-tiny", num_classes=10, hidden_size=64)
    torch.save({"state_dict": good}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="found state_dict; expected a reference checkpoint"):
        load_reference_network(tmp_path / "foreign.pt", "dit-tiny")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_reference_network(tmp_path / "cut.pt", "dit-tiny")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_reference_network(tmp_path / "absent.pt", "dit-tiny")


def test_unknown_network_name_is_named():
    with pytest.raises(ValueError, match="unknown network 'dit-q9'"):
        build("dit-q9")


@pytest.mark.parametrize("name,shape,kw", [
    ("dit-tiny", (3, 4, 16, 16), dict(num_classes=10)),
    ("unet-small", (3, 3, 16, 16), {}),
    ("mlp", (3, 2), dict(num_classes=4)),
])
def test_wrong_input_shape_names_x(name, shape, kw):
    net = build(name, **kw)
    bad = torch.zeros(shape[0], shape[1] + 1, *shape[2:])
    t = torch.full((3,), 0.5)
    with pytest.raises(ValueError, match=r"^x has shape"):
        net(bad, t, t)


@pytest.mark.parametrize("name,shape,kw", [
    ("dit-tiny", (2, 4, 16, 16), dict(num_classes=10)),
    ("unet-small", (2, 3, 16, 16), dict(label_dim=10)),
    ("mlp", (2, 2), dict(num_classes=4)),
])
def test_bf16_autocast_forward_on_cpu(name, shape, kw):
    net = randomize(build(name, **kw), std=0.05)
    x, t = torch.randn(shape), torch.tensor([0.9, 0.3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, t * 0.5, torch.tensor([1, 2]))
    ref = net(x, t, t * 0.5, torch.tensor([1, 2]))
    assert out.dtype == torch.bfloat16 and out.shape == shape
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_dit_initialization_gives_zero_output_and_embeds_gap():
    net = build("dit-tiny", num_classes=10)
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([0.7, 0.2])
    assert torch.count_nonzero(net(x, t, t * 0.5)) == 0  # adaLN-Zero: F = 0 at initialization
    randomize(net)
    same_gap = net(x, t, t - 0.1)
    shifted = net(x, t + 0.05, t - 0.05)  # same gap 0.1, different t
    assert not torch.allclose(same_gap, shifted)
    assert torch.allclose(net(x, t, t - 0.1), same_gap)


def test_unet_dropout_changes_train_output_only():
    net = randomize(build("unet-small", dropout=0.5), std=0.1)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.7, 0.2])
    net.eval()
    assert torch.equal(net(x, t, t * 0.5), net(x, t, t * 0.5))
    net.train()
    assert not torch.equal(net(x, t, t * 0.5), net(x, t, t * 0.5))


def test_class_conditional_unet_null_label_is_zero_class_vector():
    net = randomize(build("unet-small", label_dim=10))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.7, 0.2])
    null = torch.tensor([10, 10])
    assert torch.allclose(net(x, t, t * 0.5, null), net(x, t, t * 0.5, None))
    assert not torch.allclose(net(x, t, t * 0.5, torch.tensor([1, 1])), net(x, t, t * 0.5, None))
