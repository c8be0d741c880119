"""soflow.Pipeline: opening runs, drawing samples, the Hub folder layout and `soflow export`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY, assert_one_line_error, soflow, soflow_inproc
from soflow import Pipeline, SolutionFlow
from soflow.errors import CheckpointError
from soflow.nets import build
from soflow.run.config import load
from test_hostile import evil_torch_file, marker, plain_refusal  # noqa: F401  (marker is a fixture)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pipe") / "run"
    soflow_inproc("train", "--config", "toy2d", "--run-dir", run, *TINY, "--set", "train.total_steps=20", check=True)
    return run


def test_pipeline_samples_are_those_of_soflow_sample(run, tmp_path):
    pipe = Pipeline.from_pretrained(run)
    x = pipe(num=300, nfe=2, seed=3, output="tensor", batch_size=64)
    soflow_inproc("sample", "--checkpoint", run, "--num", "300", "--nfe", "2", "--seed", "3",
                  "--out", tmp_path / "x.npy", check=True)
    assert torch.equal(x, torch.from_numpy(np.load(tmp_path / "x.npy")))
    assert (pipe.config.method, pipe.step, pipe.is_points) == ("soflow", 20, True)
    with pytest.raises(ValueError, match="2-D points, not images"):
        pipe(num=2)  # PIL images of points make no sense: one clear line


def test_export_writes_the_hub_layout_that_opens_with_the_same_samples(run, tmp_path):
    hub = tmp_path / "hub"
    proc = soflow_inproc("export", "--checkpoint", run, "--out", hub, check=True)
    assert "written to" in proc.stdout
    assert sorted(p.name for p in hub.iterdir()) == ["README.md", "config.json", "model.safetensors", "samples.png"]
    info = json.loads((hub / "config.json").read_text())
    assert (info["library"], info["method"], info["sample_shape"], info["training_steps"]) == ("soflow", "soflow", [2], 20)
    card = (hub / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: soflow\n") and "![1-NFE samples](samples.png)" in card
    assert "total_steps: 20" in card  # the training config, as YAML
    assert Image.open(hub / "samples.png").format == "PNG"
    a = Pipeline.from_pretrained(run)(num=50, nfe=1, seed=1, output="tensor")
    b = Pipeline.from_pretrained(hub)(num=50, nfe=1, seed=1, output="tensor")
    assert torch.equal(a, b)
    # a folder that holds something is refused in one line, and left as it was
    assert_one_line_error(soflow_inproc("export", "--checkpoint", run, "--out", hub), "not empty")
    assert json.loads((hub / "config.json").read_text()) == info


def test_a_pipeline_folder_is_read_with_safetensors_only(run, tmp_path, marker):  # noqa: F811
    hub = Pipeline.from_pretrained(run).save_pretrained(tmp_path / "hub", grid=False)
    evil_torch_file(hub / "model.safetensors", marker, key="net")
    with pytest.raises(CheckpointError) as e:
        Pipeline.from_pretrained(hub)
    plain_refusal(str(e.value), hub / "model.safetensors")
    proc = soflow("sample", "--checkpoint", hub, "--num", "2", "--out", tmp_path / "x.npy")
    assert_one_line_error(proc, "model.safetensors")
    (hub / "model.safetensors").unlink()
    assert_one_line_error(soflow("sample", "--checkpoint", hub, "--num", "2", "--out", tmp_path / "x.npy"),
                          "has config.json but no model.safetensors")


def test_image_models_give_pil_images_or_tensors():
    torch.manual_seed(0)
    net = build("dit-tiny", in_channels=1, input_size=8, num_classes=3, null_class=True)
    pipe = Pipeline(SolutionFlow(net), load("fmnist"))
    images = pipe(num=4, nfe=1, labels=2, seed=0)
    assert [(im.mode, im.size) for im in images] == [("L", (8, 8))] * 4
    x = pipe(num=4, nfe=1, labels=2, seed=0, output="tensor")
    assert x.shape == (4, 1, 8, 8)
    assert np.array_equal(np.asarray(images[1]), ((x[1, 0] * 127.5 + 128).clamp(0, 255).to(torch.uint8)).numpy())


def test_labels_per_sample_follow_the_samples_across_batches():
    """300 samples with one label each, drawn in batches of 64, are the samples of one call."""
    from soflow.sampling import sample

    torch.manual_seed(0)
    net = build("dit-tiny", in_channels=1, input_size=8, num_classes=3, null_class=True)
    pipe = Pipeline(SolutionFlow(net), load("fmnist"))
    labels = torch.arange(300) % 3
    x = pipe.sample(300, 2, labels=labels, seed=5, batch_size=64)
    assert torch.equal(x, sample(pipe.flow, 300, nfe=2, labels=labels, seed=5, batch_size=300, mode="chain"))
    with pytest.raises(ValueError, match="labels"):
        pipe.sample(10, 1, labels=torch.arange(7) % 3)  # not one label per sample
