"""Files from anyone: no file that soflow reads may run code, and each refusal is one line that
names the file and never advises turning the protection off.

Every payload below would create a marker file when unpickled; the tests check that the marker
never appears, through the Python API and through the real command line."""

import os
import pickle
import shlex

import numpy as np
import pytest
import torch

from helpers import DATA, assert_one_line_error, soflow

ADVICE = ("weights_only", "trust")


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def plain_refusal(msg: str, path) -> str:
    """A one-line message naming `path` and free of PyTorch's advice to load unsafely."""
    assert msg and len(msg.strip().splitlines()) == 1, msg
    assert str(path) in msg, msg
    assert not any(word in msg.lower() for word in ADVICE), msg
    return msg


def refused_cli(proc, path):
    assert_one_line_error(proc, str(path))
    plain_refusal(proc.stderr, path)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "a payload ran"


def evil_torch_file(path, marker, key="fc.weight"):
    torch.save({key: Payload(marker), "format": "soflow-checkpoint-1"}, path)
    return path


def images_npz(path, n=3):
    rng = np.random.default_rng(0)
    np.savez(path, arr_0=rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8))
    return path


# ---------------------------------------------------------------------------------------------
# Inception weights: torch-fidelity's own loader would unpickle them with weights_only=False


def test_inception_weights_payload_runs_nothing(tmp_path, marker, monkeypatch):
    pytest.importorskip("torch_fidelity")
    from soflow.errors import EvalError
    from soflow.eval.inception import WEIGHTS_ENV, WEIGHTS_FILE, InceptionFeatures

    evil = evil_torch_file(tmp_path / "EVIL.pt", marker)
    with pytest.raises(EvalError) as e:
        InceptionFeatures(evil, device="cpu")
    assert "soflow will not unpickle" in plain_refusal(str(e.value), evil)

    monkeypatch.setenv(WEIGHTS_ENV, str(evil))
    with pytest.raises(EvalError) as e:
        InceptionFeatures(device="cpu", features=("64",))
    plain_refusal(str(e.value), evil)

    monkeypatch.delenv(WEIGHTS_ENV)
    cached = tmp_path / "home" / ".cache" / "soflow" / WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    evil_torch_file(cached, marker)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(EvalError) as e:
        InceptionFeatures(device="cpu", features=("64",))
    plain_refusal(str(e.value), cached)


def test_inception_weights_payload_cli(tmp_path, marker):
    pytest.importorskip("torch_fidelity")
    evil = evil_torch_file(tmp_path / "EVIL.pt", marker)
    imgs = images_npz(tmp_path / "imgs.npz")
    proc = soflow("fid", "ref", "--images", imgs, "--out", tmp_path / "ref.npz", "--inception-weights", evil,
                  "--device", "cpu")
    refused_cli(proc, evil)
    proc = soflow("fid", "ref", "--images", imgs, "--out", tmp_path / "ref.npz", "--device", "cpu",
                  env={"SOFLOW_INCEPTION_WEIGHTS": str(evil)})
    refused_cli(proc, evil)
    assert not (tmp_path / "ref.npz").exists()


# ---------------------------------------------------------------------------------------------
# Run checkpoints and the reference converter


def test_run_checkpoint_payload(tmp_path, marker):
    from soflow.run.checkpoint import CheckpointError, read_checkpoint

    evil = evil_torch_file(tmp_path / "EVIL.pt", marker, key="net")
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(evil)
    assert "not a soflow run checkpoint" in plain_refusal(str(e.value), evil)
    # PyTorch's switch for loading without the restricted unpickler must not reach soflow's reads.
    proc = soflow("sample", "--checkpoint", evil, "--num", "2", "--out", tmp_path / "x.npy",
                  env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    refused_cli(proc, evil)
    assert not (tmp_path / "x.npy").exists()


def test_reference_checkpoint_payload(tmp_path, marker):
    from soflow.reference import CheckpointError, read_reference_blob

    evil = tmp_path / "EVIL.pt"
    torch.save({"model": {"network.w": Payload(marker)}, "ema_model": {}}, evil)
    with pytest.raises(CheckpointError) as e:
        read_reference_blob(evil)
    assert "not a reference checkpoint" in plain_refusal(str(e.value), evil)
    proc = soflow("convert-reference", "--checkpoint", evil, "--config", DATA / "reference_cifar.yaml",
                  "--out", tmp_path / "run")
    refused_cli(proc, evil)


def test_plain_pickle_and_damaged_torch_files(tmp_path):
    """Not every refusal is a payload: a pickle of plain values that is not a torch file, and a
    truncated one, are one clean line too (PyTorch warns and advises on the first)."""
    from soflow.run.checkpoint import CheckpointError, read_checkpoint

    plain = tmp_path / "plain.pt"
    with open(plain, "wb") as f:
        pickle.dump({"a": 1}, f, protocol=4)
    cut = tmp_path / "cut.pt"
    torch.save({"w": torch.zeros(1000)}, cut)
    cut.write_bytes(cut.read_bytes()[:600])
    for path in (plain, cut):
        with pytest.raises(CheckpointError) as e:
            read_checkpoint(path)
        plain_refusal(str(e.value), path)
    proc = soflow("sample", "--checkpoint", plain, "--num", "2", "--out", tmp_path / "x.npy")
    refused_cli(proc, plain)


# ---------------------------------------------------------------------------------------------
# Safetensors exports given to `soflow sample`


def toy_export(path):
    from soflow.run.build import build_flow
    from soflow.run.checkpoint import export_safetensors
    from soflow.run.config import load

    cfg = load("toy2d", ["model.net_args={hidden: 16, depth: 1}"])
    flow = build_flow(cfg, (2,), 0)
    return export_safetensors(path, flow.net.state_dict(), cfg.to_dict(), 7, (2,), 0)


def test_damaged_safetensors_export(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from soflow.run.checkpoint import CheckpointError
    from soflow.run.load import load_run

    good = toy_export(tmp_path / "good.safetensors")
    assert load_run(good)[2] == 7
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    refused_cli(soflow("sample", "--checkpoint", cut, "--num", "2", "--out", tmp_path / "x.npy"), cut)

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    renamed, nometa = tmp_path / "renamed.safetensors", tmp_path / "nometa.safetensors"
    save_file({"x" + k: v for k, v in load_file(str(good)).items()}, str(renamed), metadata=meta)
    save_file(load_file(str(good)), str(nometa))
    for path, needle in ((cut, "not a readable safetensors file"), (renamed, "do not fit"), (nometa, "'config'")):
        with pytest.raises(CheckpointError) as e:
            load_run(path)
        assert needle in plain_refusal(str(e.value), path)


# ---------------------------------------------------------------------------------------------
# FID statistics and sample .npz files (numpy refuses object arrays: pickles)


def test_object_arrays_in_npz(tmp_path, marker):
    from soflow.errors import EvalError
    from soflow.eval.fid import load_stats
    from soflow.eval.images import load_images

    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.array([Payload(marker)], dtype=object), sigma=np.eye(1))
    with pytest.raises(EvalError) as e:
        load_stats(stats)
    assert "mu holds Python objects" in plain_refusal(str(e.value), stats)
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.array([Payload(marker)], dtype=object))
    with pytest.raises(EvalError) as e:
        load_images(samples)
    plain_refusal(str(e.value), samples)
    # The command line checks the reference before it reads images or weights.
    proc = soflow("fid", "calc", "--images", images_npz(tmp_path / "imgs.npz"), "--ref", stats,
                  "--inception-weights", tmp_path / "unused.pth")
    refused_cli(proc, stats)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 python batches: pickles by format, read by a restricted unpickler


def cifar_folder(folder, bad: dict):
    from test_data import write_cifar

    write_cifar(folder, n=4)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump(bad, f, protocol=2)
    return folder


@pytest.mark.parametrize("kind", ["payload", "payload-in-array", "object-labels"])
def test_cifar_batch_refusals(tmp_path, marker, kind):
    from soflow.data import DataError
    from soflow.data.images import cifar10

    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    bad = {"payload": {b"data": Payload(marker), b"labels": [0]},
           "payload-in-array": {b"data": np.array([Payload(marker)], dtype=object), b"labels": [0]},
           "object-labels": {b"data": data, b"labels": np.array([1, 2, 3, 4], dtype=object)}}[kind]
    folder = cifar_folder(tmp_path / "cifar", bad)
    with pytest.raises(DataError) as e:
        cifar10(str(folder))
    assert "not a CIFAR-10 python batch" in plain_refusal(str(e.value), folder / "data_batch_2")


def test_cifar_payload_cli(tmp_path, marker):
    folder = cifar_folder(tmp_path / "cifar", {b"data": Payload(marker), b"labels": [0]})
    proc = soflow("train", "--config", "cifar10-unet", "--run-dir", tmp_path / "run", "--set", f"data.path={folder}")
    refused_cli(proc, folder / "data_batch_2")
    assert "posix.system" in proc.stderr


# ---------------------------------------------------------------------------------------------
# HDF5 latents: object and variable-length datasets


@pytest.mark.parametrize("kind", ["vlen", "strings", "object-labels"])
def test_hdf5_latents_with_object_data(tmp_path, kind):
    h5py = pytest.importorskip("h5py")
    from soflow.data import DataError
    from soflow.data.latents import LatentData

    path = tmp_path / "latents.hdf5"
    with h5py.File(path, "w") as f:
        f["amount"] = 2
        if kind == "vlen":
            d = f.create_dataset("latents", (2,), dtype=h5py.vlen_dtype(np.float32))
            d[0], d[1] = np.zeros(3, np.float32), np.ones(2, np.float32)
        elif kind == "strings":
            f.create_dataset("latents", data=np.array([b"a", b"b"], dtype=object), dtype=h5py.string_dtype())
        else:
            f["latents"] = np.zeros((2, 8, 4, 4), np.float32)
        if kind == "object-labels":
            f.create_dataset("labels", data=np.array([b"0", b"1"], dtype=object), dtype=h5py.string_dtype())
        else:
            f["labels"] = np.array([0, 1])
    with pytest.raises(DataError) as e:
        LatentData(str(path))
    plain_refusal(str(e.value), path)
