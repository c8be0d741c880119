"""The training system end to end, through the real command line (in-process where the process does not matter)."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import TINY, assert_one_line_error, soflow, soflow_inproc
from soflow.run.checkpoint import list_checkpoints, read_checkpoint


def train(run, *extra, inproc=True, **kw):
    """`soflow train` on the tiny toy run: in this process, or with inproc=False in a subprocess."""
    return (soflow_inproc if inproc else soflow)("train", "--config", "toy2d", "--run-dir", run, *TINY, *extra, **kw)


def assert_scatter_png(path):
    """A readable 8-bit RGB(A) figure with something drawn on it (not one flat colour)."""
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode in ("RGB", "RGBA") and min(im.size) >= 100
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.min() < 128 < pixels.max() and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10


def final_state(run):
    step, path = list_checkpoints(run)[0]
    return step, read_checkpoint(path)


def test_stop_and_resume_equals_uninterrupted_run(tmp_path):
    steps = ["--set", "train.total_steps=24", "--set", "train.checkpoint_every=100"]
    train(tmp_path / "straight", *steps, check=True)
    for _ in range(3):  # 10 + 10 + 4 steps
        proc = train(tmp_path / "sliced", *steps, "--stop-after", "10", check=True)
        assert proc.returncode == 0
    s1, a = final_state(tmp_path / "straight")
    s2, b = final_state(tmp_path / "sliced")
    assert s1 == s2 == 24
    for key in ("net", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}/{name} differs after resume"
    # zip would stop at the shorter side: the same parameters must carry the same state entries
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa and sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys() and sa[i]
        assert all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i]), f"optimizer state of parameter {i} differs"
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    log = (tmp_path / "sliced" / "log.txt").read_text()
    assert "resumed from" in log and "stopped at step 10" in log


def test_run_folder_contents_and_metrics(tmp_path):
    run = tmp_path / "run"
    proc = train(run, "--set", "train.total_steps=10", "--set", "train.checkpoint_every=5", check=True)
    assert "samples written to" in proc.stdout
    assert (run / "config.yaml").is_file() and (run / "log.txt").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10]
    assert {"loss", "velocity_mse", "velocity_weight", "consistency_mse", "consistency_weight", "r", "grad_norm",
            "samples_per_s", "peak_rss_gb"} <= set(records[0])
    assert "peak_memory_gb" not in records[0] and "peak_cuda_allocated_gb" not in records[0]  # a CPU run: RSS only
    assert 0 < records[0]["peak_rss_gb"] < 64
    assert list((run / "exports").glob("*.safetensors"))
    for png in (run / "samples").glob("*.png"):
        assert_scatter_png(png)
    assert len(list((run / "samples").glob("*.png"))) == 1  # the final figure
    ckpt = read_checkpoint(list_checkpoints(run)[0][1])
    assert ckpt["config"]["train"]["total_steps"] == 10


def test_keep_last_and_every_kth(tmp_path):
    run = tmp_path / "run"
    train(run, "--set", "train.total_steps=12", "--set", "train.checkpoint_every=2", "--set", "train.keep_last=2",
          "--set", "train.keep_every=4", "--set", "train.grad_accum=2", check=True)
    assert sorted(s for s, _ in list_checkpoints(run)) == [4, 8, 10, 12]


def test_truncated_newest_checkpoint_falls_back_without_traceback(tmp_path):
    run = tmp_path / "run"
    common = ["--set", "train.total_steps=20", "--set", "train.checkpoint_every=5"]
    train(run, *common, "--stop-after", "10", check=True)
    (step, newest), (_, older) = list_checkpoints(run)[:2]
    assert step == 10
    older_bytes = older.read_bytes()
    newest.write_bytes(newest.read_bytes()[:200])  # truncated
    proc = train(run, *common, "--stop-after", "3")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "falling back" in proc.stderr
    assert "resumed from" in proc.stdout and "at step 5" in proc.stdout
    assert older.read_bytes() == older_bytes
    assert newest.with_name(newest.name + ".corrupt").stat().st_size == 200
    assert sorted(s for s, _ in list_checkpoints(run)) == [5, 8]


def test_non_finite_loss_stops_with_step_number(tmp_path):
    pts = np.random.default_rng(0).normal(size=(256, 2)).astype(np.float32) * 1e30
    np.save(tmp_path / "huge.npy", pts)
    proc = train(tmp_path / "run", "--set", "data.name=points", "--set", f"data.path={tmp_path / 'huge.npy'}",
                 "--set", "train.total_steps=20")
    assert_one_line_error(proc, "non-finite loss at step 1")
    assert not list_checkpoints(tmp_path / "run")


def test_non_finite_message_names_a_checkpoint_at_step_zero(tmp_path):
    from soflow.errors import TrainingError
    from soflow.train.loop import _check_finite

    # a run resumed at step 0 (a converted checkpoint) has a good checkpoint even though its step is falsy
    with pytest.raises(TrainingError, match="last good checkpoint is step 0 in"):
        _check_finite(torch.tensor(3), 10, 0, tmp_path)
    with pytest.raises(TrainingError, match="no checkpoint was written"):
        _check_finite(torch.tensor(3), 10, None, tmp_path)
    _check_finite(torch.tensor(11), 10, None, tmp_path)  # total + 1: every loss was finite


def test_points_data_and_missing_file(tmp_path):
    pts = np.random.default_rng(0).normal(size=(500, 3)).astype(np.float32)
    np.save(tmp_path / "p.npy", pts)
    train(tmp_path / "run", "--set", "data.name=points", "--set", f"data.path={tmp_path / 'p.npy'}",
          "--set", "train.total_steps=6", check=True)
    out = tmp_path / "x.npy"
    soflow_inproc("sample", "--checkpoint", tmp_path / "run", "--num", "10", "--out", out, check=True)
    assert np.load(out).shape == (10, 3)
    proc = train(tmp_path / "run2", "--set", "data.name=points", "--set", f"data.path={tmp_path / 'none.npy'}")
    assert_one_line_error(proc, "none.npy", "[N, D] float array")
    np.save(tmp_path / "ints.npy", np.zeros((5, 2), dtype=np.int64))
    proc = train(tmp_path / "run3", "--set", "data.name=points", "--set", f"data.path={tmp_path / 'ints.npy'}")
    assert_one_line_error(proc, "ints.npy", "int64")


def _has_content(path):
    return path.is_file() and path.stat().st_size > 0


# SIGTERM once steps are logged, or as soon as the run folder is locked (while data and model are set up)
@pytest.mark.parametrize("ready", ["metrics.jsonl", ".lock"])
def test_sigterm_saves_a_loadable_checkpoint(tmp_path, ready):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "soflow", "train", "--config", "toy2d", "--run-dir", str(run), *TINY,
           "--set", "train.total_steps=1000000", "--set", "train.checkpoint_every=1000000", "--set", "train.log_every=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not _has_content(run / ready):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    step, path = list_checkpoints(run)[0]
    assert step >= 1 and read_checkpoint(path)["step"] == step
    assert f"stopped at step {step}" in out


def test_sample_outputs_are_reproducible(tmp_path):
    run = tmp_path / "run"
    train(run, "--set", "train.total_steps=5", check=True)
    a, b, c = tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "c.npy"
    soflow_inproc("sample", "--checkpoint", run, "--num", "50", "--seed", "3", "--out", a, check=True)
    soflow_inproc("sample", "--checkpoint", run, "--num", "50", "--seed", "3", "--batch-size", "7", "--out", b,
                  check=True)
    soflow_inproc("sample", "--checkpoint", run, "--num", "50", "--seed", "4", "--out", c, check=True)
    assert np.allclose(np.load(a), np.load(b), atol=1e-6) and not np.allclose(np.load(a), np.load(c))
    export = next((run / "exports").glob("*.safetensors"))
    soflow_inproc("sample", "--checkpoint", export, "--num", "50", "--seed", "3", "--out", tmp_path / "e.npy",
                  check=True)
    assert np.allclose(np.load(a), np.load(tmp_path / "e.npy"), atol=1e-6)
    for out in ("s.png", "s.npz", "s.npy"):
        soflow_inproc("sample", "--checkpoint", run, "--num", "20", "--nfe", "2", "--mode", "chain",
                      "--out", tmp_path / out, check=True)
    with np.load(tmp_path / "s.npz") as npz:  # points go to arr_0 as floats, the same as the raw .npy
        assert list(npz.keys()) == ["arr_0"] and npz["arr_0"].shape == (20, 2) and npz["arr_0"].dtype == np.float32
        assert np.isfinite(npz["arr_0"]).all() and np.array_equal(npz["arr_0"], np.load(tmp_path / "s.npy"))
    assert_scatter_png(tmp_path / "s.png")
    proc = soflow_inproc("sample", "--checkpoint", tmp_path / "nowhere", "--num", "5", "--out", tmp_path / "z.npy")
    assert_one_line_error(proc, "nowhere")


def test_compiled_training_saves_plain_names(tmp_path):
    run = tmp_path / "run"
    train(run, "--set", "train.total_steps=3", "--set", "train.compile=true", check=True, timeout=600,
          inproc=False)  # torch.compile's caches and settings stay with the process that compiled
    ckpt = read_checkpoint(list_checkpoints(run)[0][1])
    assert ckpt["step"] == 3 and not any("_orig_mod" in k or "module." in k for k in ckpt["net"])


@pytest.mark.parametrize("method,modes", [("meanflow", ["chain"]), ("flow_matching", ["euler", "heun"])])
def test_baseline_methods_train_and_sample(tmp_path, method, modes):
    run = tmp_path / "run"
    train(run, "--set", f"method={method}", "--set", "train.total_steps=4", check=True)
    assert read_checkpoint(list_checkpoints(run)[0][1])["config"]["method"] == method
    for mode in modes:
        soflow_inproc("sample", "--checkpoint", run, "--num", "8", "--nfe", "2", "--mode", mode,
                      "--out", tmp_path / f"{mode}.npy", check=True)
        assert np.load(tmp_path / f"{mode}.npy").shape == (8, 2)
    if method == "flow_matching":  # a velocity model has no solution to jump with
        proc = soflow_inproc("sample", "--checkpoint", run, "--num", "8", "--mode", "renoise",
                             "--out", tmp_path / "x.npy")
        assert_one_line_error(proc, "--mode renoise")
