"""Image pipelines end to end on small synthetic data, through `soflow train` and `soflow sample`."""

import gzip
import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_one_line_error, soflow_inproc
from soflow.data.images import FASHION_MNIST_DIR, center_crop_arr, fashion_mnist

FAST = ["--set", "train.log_every=2", "--set", "train.checkpoint_every=100", "--set", "train.sample_nfe=[1]"]
SMALL_UNET = ["--set", "model.net=unet-small", "--set",
              "model.net_args={model_channels: 16, channel_mult: [1, 2], num_blocks: 1, attn_resolutions: [8], dropout: 0.1}"]


def write_idx(path: Path, magic: int, array: np.ndarray, gz=True):
    head = struct.pack(f">{1 + array.ndim}i", magic, *array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(head + array.astype(np.uint8).tobytes())


def fake_fmnist(folder: Path, n=64):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    write_idx(folder / "train-images-idx3-ubyte.gz", 2051, rng.integers(0, 256, (n, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", 2049, np.arange(n) % 10)
    return folder


def test_fmnist_pipeline_end_to_end(tmp_path):
    data = fake_fmnist(tmp_path / "fm")
    run = tmp_path / "run"
    soflow_inproc("train", "--config", "fmnist", "--run-dir", run, "--set", f"data.path={data}",
                  "--set", "train.batch_size=16", "--set", "train.total_steps=3", *FAST, *SMALL_UNET[:2], "--set",
                  "model.net_args={model_channels: 16, channel_mult: [1, 2], num_blocks: 1, attn_resolutions: [14]}",
                  check=True)
    grids = list((run / "samples").glob("*.png"))
    assert grids and Image.open(grids[0]).size == (28 * 10, 28 * 10)  # one row per class
    soflow_inproc("sample", "--checkpoint", run, "--num", "6", "--class", "3", "--out", tmp_path / "s.npz", check=True)
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (6, 28, 28, 1) and arr.dtype == np.uint8
    soflow_inproc("sample", "--checkpoint", run, "--num", "4", "--out", tmp_path / "pngs", check=True)
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 4


@pytest.mark.parametrize("damage,needle", [
    ("magic", "magic number 2049, expected 2051"),
    ("truncated", "data bytes, expected"),
    ("labels", "label 12 out of range"),
    ("missing", "missing; expected the Fashion-MNIST IDX files"),
])
def test_malformed_fmnist_is_one_line(tmp_path, damage, needle):
    data = fake_fmnist(tmp_path / "fm", n=20)
    if damage == "magic":
        write_idx(data / "train-images-idx3-ubyte.gz", 2049, np.zeros((20, 28, 28)))
    elif damage == "truncated":
        raw = gzip.open(data / "train-images-idx3-ubyte.gz").read()
        with gzip.open(data / "train-images-idx3-ubyte.gz", "wb") as f:
            f.write(raw[:-100])
    elif damage == "labels":
        write_idx(data / "train-labels-idx1-ubyte.gz", 2049, np.full(20, 12))
    else:
        (data / "train-labels-idx1-ubyte.gz").unlink()
    proc = soflow_inproc("train", "--config", "fmnist", "--run-dir", tmp_path / "run", "--set", f"data.path={data}")
    assert_one_line_error(proc, needle, "fm/train-")


def write_cifar(folder: Path, n=16):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        blob = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(blob, f, protocol=2)
    return folder


def test_cifar10_preset_with_augmentation_end_to_end(tmp_path):
    data = write_cifar(tmp_path / "cifar")
    run = tmp_path / "run"
    soflow_inproc("train", "--config", "cifar10-unet", "--run-dir", run, "--set", f"data.path={data}", "--set",
                  "train.batch_size=8", "--set", "train.total_steps=3", *FAST, *SMALL_UNET[:2], "--set",
                  "model.net_args={model_channels: 16, channel_mult: [1, 2], num_blocks: 1, attn_resolutions: [16]}",
                  check=True)
    ckpt = torch.load(sorted((run / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert ckpt["net"]["map_augment.weight"].shape[1] == 6  # augment labels feed the U-Net
    assert ckpt["config"]["data"]["augment_p"] == 0.12 and ckpt["num_classes"] == 0
    soflow_inproc("sample", "--checkpoint", run, "--num", "5", "--out", tmp_path / "c.npz", check=True)
    assert np.load(tmp_path / "c.npz")["arr_0"].shape == (5, 32, 32, 3)


def test_cifar_batches_refuse_foreign_pickles(tmp_path):
    data = write_cifar(tmp_path / "cifar", n=4)
    with open(data / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Path("x"), b"labels": []}, f)
    proc = soflow_inproc("train", "--config", "cifar10-unet", "--run-dir", tmp_path / "run",
                         "--set", f"data.path={data}")
    assert_one_line_error(proc, "data_batch_3", "not a CIFAR-10 python batch")


def write_folder(root: Path, per_class=5):
    rng = np.random.default_rng(2)
    for k, name in enumerate(["cats", "dogs"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (40 + 3 * i, 30 + 2 * k)
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_dataset_traits_are_asked_by_name():
    """Each dataset's traits in one table: which are images, which latents, which carry labels."""
    from soflow.data import DATASETS, IMAGE_DATASETS, has_labels, traits
    from soflow.run.config import DataConfig

    assert IMAGE_DATASETS == ("fmnist", "cifar10", "imagefolder", "imagenet-latents")
    assert DATASETS[-5:] == ("points", *IMAGE_DATASETS) and "checkerboard" in DATASETS
    assert [n for n in DATASETS if traits(n).latent] == ["imagenet-latents"]
    for name in (*DATASETS, "no-such-data"):
        for conditional in (True, False):
            always = name in ("imagefolder", "imagenet-latents")
            expected = always or (name in ("fmnist", "cifar10") and conditional)
            assert has_labels(DataConfig(name=name, conditional=conditional)) == expected, (name, conditional)
    assert traits("no-such-data") == traits("points")  # no traits; the config check names the choices


def test_center_crop_matches_adm_rule():
    img = Image.fromarray(np.arange(100 * 60 * 3, dtype=np.uint32).reshape(60, 100, 3).astype(np.uint8))
    out = center_crop_arr(img, 16)
    assert out.shape == (16, 16, 3)
    # 60 >= 2*16: box-halved to 50x30, then bicubic to 27x16, then the centre 16 columns
    ref = np.asarray(img.resize((50, 30), Image.BOX).resize((27, 16), Image.BICUBIC))[:, 5:21]
    assert np.array_equal(out, ref)


def test_image_folder_end_to_end_and_empty_folder(tmp_path):
    root = write_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    soflow_inproc("train", "--config", "toy2d", "--run-dir", run, "--set", "data.name=imagefolder",
                  "--set", f"data.path={root}",
                  "--set", "data.resolution=16", "--set", "data.num_workers=2", "--set", "model.net=dit-tiny",
                  "--set", "model.net_args={}", "--set", "train.batch_size=4", "--set", "train.total_steps=3",
                  "--set", "objective.cfg_drop_rate=0.1", "--set", "objective.cfg_scale=2", *FAST, check=True)
    soflow_inproc("sample", "--checkpoint", run, "--num", "3", "--class", "1", "--out", tmp_path / "g.png", check=True)
    assert Image.open(tmp_path / "g.png").size[0] % 16 == 0
    (tmp_path / "empty" / "a").mkdir(parents=True)
    proc = soflow_inproc("train", "--config", "toy2d", "--run-dir", tmp_path / "r2", "--set", "data.name=imagefolder",
                         "--set", f"data.path={tmp_path / 'empty'}", "--set", "model.net=dit-tiny",
                         "--set", "model.net_args={}")
    assert_one_line_error(proc, "empty", "no images found")


def tiny_vae(folder: Path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=16)
    vae.save_pretrained(folder)
    return folder


def test_latents_encode_resume_train_and_decode(tmp_path):
    root = write_folder(tmp_path / "imgs", per_class=5)
    vae = tiny_vae(tmp_path / "vae")
    out = tmp_path / "latents"
    args = ("encode-latents", "--data", root, "--vae", vae, "--out", out, "--resolution", "16", "--shard-size", "4")
    soflow_inproc(*args, check=True)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_shards"] == 3 and meta["classes"] == ["cats", "dogs"]
    assert np.load(out / "shard-00000" / "mean.npy").shape == (4, 4, 8, 8)
    # resumable: only the missing shard is encoded again
    before = (out / "shard-00000" / "mean.npy").stat().st_mtime_ns
    shutil.rmtree(out / "shard-00002")
    proc = soflow_inproc(*args, check=True)
    assert "encoded 1 shard" in proc.stdout and (out / "shard-00000" / "mean.npy").stat().st_mtime_ns == before
    run = tmp_path / "run"
    proc = soflow_inproc("train", "--config", "imagenet-dit-b4", "--run-dir", run, "--set", f"data.path={out}", "--set",
                         f"data.vae={vae}", "--set", "model.net=dit-tiny", "--set", "train.batch_size=4", "--set",
                         "train.total_steps=3", *FAST, "--set", "train.device=cpu", check=True)
    grids = sorted((run / "samples").glob("*.png"))
    assert grids and "no data.vae" not in proc.stderr
    for png in grids:  # decoded RGB grids, not blank
        pixels = np.asarray(Image.open(png).convert("RGB"))
        assert pixels.dtype == np.uint8 and pixels.shape[2] == 3 and pixels.std() > 0
    soflow_inproc("sample", "--checkpoint", run, "--num", "2", "--out", tmp_path / "x.npz", check=True)
    arr = np.load(tmp_path / "x.npz")["arr_0"]
    assert arr.shape == (2, 16, 16, 3) and arr.dtype == np.uint8 and arr.std() > 0


def test_reference_hdf5_latents_train(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(3)
    with h5py.File(tmp_path / "imagenet_latent.hdf5", "w") as f:
        f["latents"] = np.concatenate([rng.normal(size=(12, 4, 8, 8)), np.full((12, 4, 8, 8), 0.1)], 1).astype(np.float32)
        f["labels"] = rng.integers(0, 1000, 12)
        f["amount"] = 12
        f["latent_size"] = 8
    from soflow.data.latents import LatentData

    data = LatentData(str(tmp_path / "imagenet_latent.hdf5"))
    x, y = data.batch(0, 0, 0, 1, 6)
    assert x.shape == (6, 4, 8, 8) and data.num_classes == 1000 and y.max() < 1000
    x2, _ = data.batch(0, 1, 0, 1, 6)
    assert not torch.equal(x, x2)  # a fresh posterior draw every step
    proc = soflow_inproc("train", "--config", "imagenet-dit-b4", "--run-dir", tmp_path / "run", "--set",
                         f"data.path={tmp_path / 'imagenet_latent.hdf5'}", "--set", "model.net=dit-tiny", "--set",
                         "train.batch_size=4", "--set", "train.total_steps=2", *FAST, "--set", "train.device=cpu",
                         check=True)
    # without a decoder the preview grids are skipped, and the run says so once
    assert proc.stderr.count("no data.vae: latent sample grids are not decoded") == 1


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    data = fashion_mnist()
    assert data.images.shape == (60000, 1, 28, 28) and data.images.dtype == torch.uint8
    assert torch.bincount(data.labels).tolist() == [6000] * 10
    test = fashion_mnist(split="test")
    assert len(test) == 10000
