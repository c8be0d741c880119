"""Model folders and exports from strangers: the metadata decides nothing before it is checked
against the tensors in the file, config.json cannot contradict it, a VAE path is followed only
inside the folder, and saving never silently replaces a model.

Every hostile file here is a real safetensors file whose header says what an attacker chose."""

import json
import resource
import time

import pytest

from helpers import assert_one_line_error, soflow
from soflow import Pipeline, SolutionFlow
from soflow.errors import CheckpointError, ConfigError, DataError
from soflow.nets import build
from soflow.run.config import load


def tiny_points_pipeline() -> Pipeline:
    cfg = load(base={"model": {"net_args": {"hidden": 16, "depth": 1}}})
    return Pipeline(SolutionFlow(build("mlp", dim=2, hidden=16, depth=1)), cfg, step=7)


def latent_pipeline(vae: str | None) -> Pipeline:
    cfg = load(base={"data": {"name": "imagenet-latents", "vae": vae}, "model": {"net": "dit-tiny"}})
    net = build("dit-tiny", in_channels=4, input_size=8, num_classes=0, null_class=False)
    return Pipeline(SolutionFlow(net), cfg, step=3)


def rewrite_metadata(path, **changes):
    """Rewrite the export at `path` with the same tensors and some metadata entries replaced
    (values are JSON-encoded, as soflow writes them; a str is written as it is)."""
    from soflow.run.checkpoint import write_safetensors, written_atomically
    from soflow.safeload import load_safetensors

    state, meta = load_safetensors(path)
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in changes.items()})
    with written_atomically(path, "export") as f:
        write_safetensors(f, state, meta)
    return path


def with_config(path, **sections):
    """The export at `path` with config sections laid over its metadata's config."""
    from soflow.safeload import load_safetensors

    _, meta = load_safetensors(path)
    config = json.loads(meta["config"])
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    return rewrite_metadata(path, config=json.dumps(config))


@pytest.fixture
def export(tmp_path):
    pipe = tiny_points_pipeline()
    folder = pipe.save_pretrained(tmp_path / "model", grid=False)
    return folder / "model.safetensors"


def refused_quickly(source, *needles):
    """from_pretrained refuses `source` in one line naming it, within a second and without
    growing the process by more than 200 MB."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        Pipeline.from_pretrained(source)
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and str(source) in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


@pytest.mark.parametrize("changes, needle", [
    (dict(sample_shape=[-2]), "sample_shape [-2]"),
    (dict(sample_shape=[2, 100000, 100000]), "sample_shape"),
    (dict(sample_shape="[1e400]"), "sample_shape"),
    (dict(sample_shape=[True]), "sample_shape"),
    (dict(num_classes=10 ** 9), "num_classes 1000000000"),
    (dict(num_classes=-1), "num_classes -1"),
    (dict(step="-5"), "step -5"),
])
def test_sizes_in_the_metadata_are_bounded_by_the_tensors(export, changes, needle):
    refused_quickly(rewrite_metadata(export, **changes), needle)


@pytest.mark.parametrize("net_args, needle", [
    ({"hidden": 2_000_000}, "model.net_args.hidden is 2000000"),  # a 160 GB network, once
    ({"depth": 10 ** 9}, "model.net_args.depth"),  # a billion blocks to build
    ({"hidden": 16, "depth": 2}, "do not fit"),  # plausible, but not what the file holds
    ({"hidden": "wide"}, "describes no network"),
])
def test_a_network_larger_than_the_file_is_never_built(export, net_args, needle):
    refused_quickly(with_config(export, model={"net_args": net_args}), needle)


def test_hostile_metadata_through_the_command_line(export, tmp_path):
    with_config(export, model={"net_args": {"hidden": 2_000_000, "depth": 1}})
    proc = soflow("sample", "--checkpoint", export.parent, "--num", "4", "--out", tmp_path / "x.npy")
    assert_one_line_error(proc, "model.safetensors", "model.net_args.hidden")
    assert not (tmp_path / "x.npy").exists()


def test_a_checkpoint_with_hostile_sizes_is_refused(tmp_path):
    from soflow.run.checkpoint import atomic_save, run_state

    pipe = tiny_points_pipeline()
    state = pipe.flow.net.state_dict()
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-00000001.pt"
    atomic_save({"format": "soflow-checkpoint-1", **run_state(1, pipe.config.to_dict(), [-3], 0, state, state)}, ckpt)
    refused_quickly(ckpt, "sample_shape [-3]")


def test_config_json_that_disagrees_with_the_weights_is_refused(export):
    folder = export.parent
    info = json.loads((folder / "config.json").read_text())
    assert Pipeline.from_pretrained(folder).step == 7  # as saved: opens
    (folder / "config.json").write_text(json.dumps({**info, "num_classes": 10}))
    refused_quickly(folder, "config.json: num_classes is 10 but 0 in the metadata", "decides")
    (folder / "config.json").write_text("[1, 2")
    refused_quickly(folder, "config.json: not a readable JSON file")


def test_a_vae_path_is_followed_only_inside_the_folder(tmp_path):
    outside = tmp_path / "elsewhere" / "vae"
    folder = latent_pipeline(str(outside)).save_pretrained(tmp_path / "model", grid=False)
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.vae_path is None and pipe.config.data.vae is None
    with pytest.raises(DataError, match="not followed.*--vae"):
        pipe.vae  # noqa: B018
    assert Pipeline.from_pretrained(folder, vae=str(outside)).vae_path == str(outside)  # the user's choice

    inside = latent_pipeline("vae").save_pretrained(tmp_path / "model2", grid=False)
    assert Pipeline.from_pretrained(inside).vae_path == str(inside / "vae")  # relative to the folder
    climbing = latent_pipeline("../elsewhere/vae").save_pretrained(tmp_path / "model3", grid=False)
    assert Pipeline.from_pretrained(climbing).vae_path is None
    assert Pipeline.from_pretrained(climbing.parent / "model3" / "model.safetensors").vae_path is None


def test_save_pretrained_never_replaces_a_model_unless_told(export):
    folder = export.parent
    before = export.read_bytes()
    other = tiny_points_pipeline()
    other.step = 150
    with pytest.raises(ConfigError, match="overwrite=True"):
        other.save_pretrained(folder, grid=False)
    assert export.read_bytes() == before
    other.save_pretrained(folder, grid=False, overwrite=True)
    assert Pipeline.from_pretrained(folder).step == 150
    with pytest.raises(ConfigError, match="is a file"):
        other.save_pretrained(export, grid=False, overwrite=True)


def test_model_card_snippet_fits_the_kind_of_model(export, tmp_path):
    card = (export.parent / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0].replace('"THIS_FOLDER"', repr(str(export.parent)))
    scope = {}
    exec(snippet, scope)  # the card's own code runs as written
    assert scope["points"].shape == (2000, 2)
    image_card = latent_pipeline(None).save_pretrained(tmp_path / "img", grid=False) / "README.md"
    assert "images = pipe(num=16, nfe=1, seed=0)" in image_card.read_text()


def test_pipeline_counts_and_seed_are_checked(export):
    pipe = Pipeline.from_pretrained(export.parent)
    for kw, needle in [(dict(num=-3), "num must be a positive integer, got -3"), (dict(num=0), "num"),
                       (dict(nfe=0), "nfe"), (dict(seed=-1), "seed")]:
        with pytest.raises(ConfigError, match=needle):
            pipe(**{"num": 2, **kw}, output="tensor")
