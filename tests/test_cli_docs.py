"""Every command the README shows, run once through the real command line on a small toy2d run,
checking what each one says it does (files, shapes, values, JSON), plus the help, examples and
version a new user reads first."""

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import soflow
from helpers import TINY, assert_one_line_error, soflow as run_soflow, soflow_inproc
from soflow.run.presets import preset_names

STEPS = 100
NUM = 64
# (sub-command words, a phrase of its description): every command and sub-command a user can ask about
COMMANDS = [
    ((), "Solution Flow Models"),
    (("train",), "run folder"),
    (("sample",), "Sample i depends only on"),
    (("encode-latents",), "SD-VAE latent shards"),
    (("fid",), "InceptionV3"),
    (("fid", "ref"), "statistics (mu, sigma)"),
    (("fid", "calc"), "FID of an image source"),
    (("eval",), "one JSON line"),
    (("eval", "points"), "Energy distance"),
    (("eval", "fmnist"), "Fashion-MNIST classifier"),
    (("convert-reference",), "soflow run folder"),
    (("env",), "bug report"),
]


def parallel(calls):
    """Run independent CLI calls two at a time (each is mostly the interpreter start-up)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda args: run_soflow(*args), calls))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """README step 1 (`soflow train --config toy2d --run-dir runs/toy2d`), at a tiny size."""
    run = tmp_path_factory.mktemp("toy") / "runs" / "toy2d"
    proc = run_soflow("train", "--config", "toy2d", "--run-dir", run, *TINY, "--set", f"train.total_steps={STEPS}",
                      "--set", "train.log_every=25", "--set", "train.sample_nfe=[1, 2]", check=True)
    return run, proc


def lines_naming(text: str, path: Path) -> list[str]:
    return [line for line in text.splitlines() if str(path) in line]


def test_train_reports_start_progress_and_samples_once(toy):
    run, proc = toy
    out = proc.stdout.splitlines()
    # One status line before the first step, whether or not stdout is a terminal (here: a pipe).
    start = [line for line in out if line.startswith("training ")]
    assert len(start) == 1 and out.index(start[0]) < min(i for i, line in enumerate(out) if line.startswith("step "))
    assert re.fullmatch(rf"training soflow on checkerboard \(mlp\): step 0/{STEPS} on cpu, [\d,]+ parameters, "
                        rf"batch 64; logs in {re.escape(str(run.resolve() / 'log.txt'))}", start[0]), start[0]
    # A plain status line every train.log_every steps: step/total, then the metrics.
    progress = [line for line in out if line.startswith("step ")]
    assert [line.split(" |")[0].split(",")[0] for line in progress] == [f"step {k}/{STEPS}" for k in (25, 50, 75, 100)]
    assert all(" left" in line for line in progress[:-1]) and "loss " in progress[0]
    # The sample figure: named once, by its absolute path, and it exists.
    figures = sorted((run / "samples").glob("*.png"))
    assert [f.name for f in figures] == [f"step{STEPS:08d}.png"]
    named = lines_naming(proc.stdout, figures[0].resolve())
    assert named == [f"samples written to {figures[0].resolve()}"], proc.stdout
    assert Image.open(figures[0]).text["Title"] == f"step {STEPS}, EMA weights"
    export = run.resolve() / "exports" / f"ema-{STEPS:08d}.safetensors"
    assert f"EMA weights exported to {export}" in out and export.is_file()
    # What the README lists in a run folder, with finite metrics.
    assert (run / "config.yaml").is_file() and list((run / "checkpoints").glob("ckpt-*.pt"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [25, 50, 75, 100]
    assert all(math.isfinite(v) for r in records for v in r.values())
    assert not re.search(r"\b1 steps\b", proc.stdout)


def test_sample_to_every_output_type(toy, tmp_path):
    run, _ = toy
    base = ("sample", "--checkpoint", run, "--num", NUM)
    png, npy1, npz2, renoise = tmp_path / "toy.png", tmp_path / "x1.npy", tmp_path / "x2.npz", tmp_path / "renoise.npy"
    procs = parallel([(*base, "--nfe", 1, "--out", png),
                      (*base, "--nfe", 1, "--out", npy1),
                      (*base, "--nfe", 2, "--out", npz2),
                      ("sample", "--checkpoint", run, "--num", 1, "--nfe", 2, "--mode", "renoise", "--out", renoise),
                      (*base, "--nfe", 1, "--out", tmp_path / "pngs")])
    for proc, out in zip(procs[:4], (png, npy1, npz2, renoise)):
        assert proc.returncode == 0, proc.stderr
        assert out.is_file()
        assert proc.stdout.splitlines()[-1].endswith(f"written to {out.resolve()}"), proc.stdout
    # How the samples were drawn, in the message and in the figure's title (drawn on it, stored as Title).
    assert procs[0].stdout.startswith(f"{NUM} samples (soflow, 1 NFE, chain, step {STEPS}, EMA weights)")
    assert procs[2].stdout.startswith(f"{NUM} samples (soflow, 2 NFE, chain, step {STEPS}, EMA weights)")
    assert procs[3].stdout.startswith(f"1 sample (soflow, 2 NFE, renoise, step {STEPS}, EMA weights)")
    assert Image.open(png).text["Title"] == f"1 NFE, chain, step {STEPS}, EMA weights"
    # .npy: raw float points; .npz: arr_0; all finite, on the scale of the [-2, 2]^2 board.
    x1 = np.load(npy1)
    with np.load(npz2) as z:
        assert list(z) == ["arr_0"]
        x2 = z["arr_0"]
    x_renoise = np.load(renoise)
    assert x1.shape == x2.shape == (NUM, 2) and x_renoise.shape == (1, 2)
    assert x1.dtype == x2.dtype == x_renoise.dtype == np.float32
    for x in (x1, x2, x_renoise):
        assert np.isfinite(x).all() and np.abs(x).max() < 8
    assert 0.2 < x1.std() < 4 and 0.2 < x2.std() < 4  # the spread of NUM samples (one sample has none)
    # 2 chained steps move every sample off the 1-step one; re-noising at 2 NFE draws fresh noise.
    assert not np.allclose(x1, x2) and not np.allclose(x2[:1], x_renoise)
    # A folder holds one PNG per image sample: points are refused with one line, and nothing is made.
    assert_one_line_error(procs[4], "a folder of PNGs needs image samples", "use .npy or .npz")
    assert not (tmp_path / "pngs").exists()


def test_eval_points_json(toy, tmp_path):
    run, _ = toy
    proc = run_soflow("eval", "points", "--checkpoint", run, "--nfe", 1, "--num", 500, "--json", tmp_path / "e.json",
                      check=True)
    result = json.loads(proc.stdout)
    assert result == json.loads((tmp_path / "e.json").read_text())
    assert {k: result[k] for k in ("method", "nfe", "step", "num")} == {"method": "soflow", "nfe": 1, "step": STEPS,
                                                                         "num": 500}
    for key in ("energy_distance", "sliced_w2"):
        assert math.isfinite(result[key]) and result[key] >= 0


def test_help_of_every_command_describes_it_with_examples():
    procs = [soflow_inproc(*args) for args in [(*words, "--help") for words, _ in COMMANDS] + [("--version",)]]
    for (words, phrase), proc in zip(COMMANDS, procs):
        assert proc.returncode == 0 and not proc.stderr, proc.stderr
        text = " ".join(proc.stdout.split())  # argparse wraps option help: compare words
        assert phrase in text, (words, proc.stdout)
        assert "examples:" in proc.stdout and f"soflow {' '.join(words)}".strip() in proc.stdout.split("examples:")[1]
    by_name = {words: proc.stdout for (words, _), proc in zip(COMMANDS, procs)}
    for name in ("train", "sample", "encode-latents", "fid", "eval", "convert-reference", "env"):
        assert name in by_name[()]  # the top-level help lists every command
    train_help = " ".join(by_name[("train",)].split())
    assert all(p in train_help for p in preset_names()) and "toy2d" in preset_names()
    sample_help = " ".join(by_name[("sample",)].split())
    for default in ("(default: 64)", "(default: 1)", "(default: 0)", "(default: ema)", "(default: 256)"):
        assert default in sample_help, default
    assert procs[-1].returncode == 0 and procs[-1].stdout.strip() == f"soflow {soflow.__version__}"


def test_module_docstring_lists_every_command():
    from soflow import cli

    subcommands = cli.build_parser()._subparsers._group_actions[0].choices
    assert set(subcommands) == {"train", "sample", "export", "encode-latents", "fid", "eval", "convert-reference",
                                "env"}
    for name in subcommands:
        assert f"`{name}" in cli.__doc__, name


def test_image_grid_title_leaves_the_cells_in_place(tmp_path):
    import torch

    from soflow.plots import image_grid, sample_title, to_uint8

    images = torch.linspace(-1, 1, 6 * 3 * 4 * 5).reshape(6, 3, 4, 5)
    title = sample_title("flow_matching", 3, "heun", step=7, guidance=2.0, weights="ema", label=1)
    assert title == "5 NFE, heun, 3 steps, class 1, guidance 2, step 7, EMA weights"
    grid = Image.open(image_grid(tmp_path / "g.png", images, rows=2, title=title))
    assert grid.text["Title"] == title and grid.size == (3 * 5, 2 * 4)
    cell = np.asarray(grid)[4:8, 5:10]  # row 1, column 1: image 4
    assert np.array_equal(cell, to_uint8(images[4:5])[0])
