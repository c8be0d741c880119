"""Resumes do what the files say (changed optimizer settings are applied, another network size is
one line naming the setting), run files get the mode of any new file, a full disk is one line and
leaves no temporary file, and a trainer removes the temporary files of killed writers."""

import io
import os
import shutil
import stat
import subprocess

import pytest
import torch

from helpers import TINY, assert_one_line_error, on_full_disk, soflow_inproc
from soflow.run.checkpoint import list_checkpoints, read_checkpoint

BASE_STEPS = 10


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 10-step run (checkpoints at 5 and 10) that each test copies."""
    run = tmp_path_factory.mktemp("base") / "run"
    soflow_inproc("train", "--config", "toy2d", "--run-dir", run, *TINY, "--set", f"train.total_steps={BASE_STEPS}",
                  "--set", "train.checkpoint_every=5", check=True)
    return run


def _copy(base_run, dest):
    shutil.copytree(base_run, dest)
    (dest / ".lock").unlink(missing_ok=True)
    return dest


def _finish(proc, check=True):
    out, err = proc.communicate(timeout=300)
    if check:
        assert proc.returncode == 0, err
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# ------------------------------------------------------------------------------------------------
# What the config says on a resume is what the run does


def test_resume_trains_with_changed_optimizer_settings(base_run, tmp_path):
    same, changed = _copy(base_run, tmp_path / "same"), _copy(base_run, tmp_path / "changed")
    more = ["--set", "train.total_steps=12"]
    plain = soflow_inproc("train", "--run-dir", same, *more, check=True)
    new = soflow_inproc("train", "--run-dir", changed, *more, "--set", "train.lr=0.5",
                        "--set", "train.betas=[0.5, 0.9]", "--set", "train.weight_decay=0.1", check=True)
    assert "optimizer settings" not in plain.stdout
    assert ("optimizer settings of the config applied over the checkpoint's: lr 0.002 -> 0.5, "
            "betas (0.9, 0.99) -> (0.5, 0.9), weight_decay 0.0 -> 0.1") in new.stdout, new.stdout

    start = read_checkpoint(base_run / "checkpoints" / f"ckpt-{BASE_STEPS:08d}.pt")
    a, b = (read_checkpoint(run / "checkpoints" / "ckpt-00000012.pt") for run in (same, changed))
    assert all(g["lr"] == 0.002 for g in a["optimizer"]["param_groups"])
    assert all((g["lr"], tuple(g["betas"]), g["weight_decay"]) == (0.5, (0.5, 0.9), 0.1)
               for g in b["optimizer"]["param_groups"])
    assert b["config"]["train"]["lr"] == 0.5
    # Adam moves a weight by about lr per step: two steps at 0.5 move some weight far more than
    # two steps at 0.002 can.
    moved = {name: max((r["net"][k] - start["net"][k]).abs().max().item() for k in start["net"])
             for name, r in (("same", a), ("changed", b))}
    assert moved["same"] < 0.05 and moved["changed"] > 0.1, moved


def test_resume_with_another_network_size_names_the_setting(base_run, tmp_path):
    run = _copy(base_run, tmp_path / "run")
    config_before = (run / "config.yaml").read_text()
    # A checkpoint whose own config does not match its tensors (sampling uses that config).
    blob = read_checkpoint(run / "checkpoints" / f"ckpt-{BASE_STEPS:08d}.pt")
    blob["config"]["model"]["net_args"]["hidden"] = 64
    odd = tmp_path / "odd.pt"
    torch.save(blob, odd)

    resumed = soflow_inproc("train", "--run-dir", run, "--set", "model.net_args.hidden=64")
    sampled = soflow_inproc("sample", "--checkpoint", odd, "--num", "4", "--out", tmp_path / "x.npy")

    assert_one_line_error(resumed, f"ckpt-{BASE_STEPS:08d}.pt: tensors do not fit the network of this config",
                          "model.net_args.hidden is 64 here but 32 in the checkpoint", "in the file but (64, ")
    assert_one_line_error(sampled, f"{odd}: tensors do not fit the network of its own config",
                          "'hidden': 64", "in the file but (64, ")
    assert [s for s, _ in list_checkpoints(run)] == [BASE_STEPS, 5]  # nothing written
    assert (run / "config.yaml").read_text() == config_before
    assert not (tmp_path / "x.npy").exists()


# ------------------------------------------------------------------------------------------------
# Files


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_run_files_get_the_mode_of_new_files(base_run, tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    written = [*(base_run / "checkpoints").glob("*.pt"), *(base_run / "exports").iterdir()]
    assert {_mode(p) for p in written} == {0o666 & ~umask}, [(p.name, oct(_mode(p))) for p in written]

    run = tmp_path / "run"  # another umask is respected too
    os.umask(0o027)
    try:
        soflow_inproc("train", "--config", "toy2d", "--run-dir", run, *TINY, "--set", "train.total_steps=2", check=True)
    finally:
        os.umask(umask)
    written = [*(run / "checkpoints").iterdir(), *(run / "exports").iterdir(), *(run / "samples").iterdir()]
    assert len(written) == 3 and {_mode(p) for p in written} == {0o640}, [(p.name, oct(_mode(p))) for p in written]


def test_exports_write_what_safetensors_writes(tmp_path):
    from safetensors.torch import load_file, save

    from soflow.run.checkpoint import export_safetensors, write_safetensors

    state = {"w": torch.randn(3, 4), "d": torch.randn(5, dtype=torch.float64), "h": torch.randn(7).bfloat16(),
             "n": torch.tensor(3), "flag": torch.tensor([True, False, True]), "empty": torch.zeros(0, 2),
             "strided": torch.randn(4, 6)[:, ::2]}
    path = export_safetensors(tmp_path / "e.safetensors", state, {"a": 1}, 7, (2,), 0)
    loaded = load_file(str(path))
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], v) for k, v in state.items())
    # byte for byte what safetensors writes (with one metadata entry, whose order is then fixed)
    some = {k: state[k].contiguous() for k in ("w", "d", "h", "flag", "strided")}
    mine = io.BytesIO()
    write_safetensors(mine, some, {"k": "v"})
    assert mine.getvalue() == save(some, {"k": "v"})


# A runner whose disk fills up for the files named by $FULL (a regex on the file name): their
# first 4096 bytes fit, the next write fails with ENOSPC.
def _temporaries(folder):
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name or ".part" in p.name]


def test_full_disk_while_exporting_or_writing_samples(base_run, tmp_path):
    run = _copy(base_run, tmp_path / "run")
    (run / "exports").rename(tmp_path / "old-exports")  # the run looks stopped before its export
    export = on_full_disk(r"^\.ema-.*\.tmp$", "train", "--run-dir", run)
    out = tmp_path / "x.npz"
    sample = on_full_disk(r"\.part\d+\.npy$", "sample", "--checkpoint", run, "--num", "2000", "--out", out)
    export, sample = _finish(export, check=False), _finish(sample, check=False)
    assert_one_line_error(export, f"could not write export {run}/exports/ema-{BASE_STEPS:08d}.safetensors: "
                                  "No space left on device")
    assert_one_line_error(sample, "could not write", "x.npz", "No space left on device")
    assert not _temporaries(tmp_path) and not out.exists()

    figure = _finish(on_full_disk(r"^\.step.*\.tmp\.png$", "train", "--run-dir", run), check=False)
    assert_one_line_error(figure, f"could not write {run}/samples/step{BASE_STEPS:08d}.png: No space left on device")
    assert (run / "exports" / f"ema-{BASE_STEPS:08d}.safetensors").is_file()  # written before the figure
    assert not _temporaries(tmp_path)


def test_a_trainer_removes_temporary_files_of_killed_writers(base_run, tmp_path):
    run = _copy(base_run, tmp_path / "run")
    stale = [run / "checkpoints" / ".ckpt-00000011.pt.4242.tmp", run / "checkpoints" / ".best-fid.json.7.tmp",
             run / "exports" / ".ema-00000011.safetensors.4242.tmp", run / "samples" / ".step00000011.png.99.tmp.png"]
    kept = [run / "checkpoints" / "notes.tmp", run / "samples" / ".mine.png.1.tmp.png"]  # not names a trainer writes
    for p in stale + kept:
        p.write_bytes(b"partial")
    proc = soflow_inproc("train", "--run-dir", run, "--set", "train.total_steps=11", check=True)
    assert "removed 4 temporary files of interrupted writes" in proc.stdout, proc.stdout
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert list_checkpoints(run)[0][0] == 11


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_best_fid_record_is_read_like_any_checkpoint(tmp_path):
    from soflow.run.checkpoint import CheckpointError, best_fid_paths, read_best_fid, save_best_fid

    record = {"score": 1.5, "step": 3, "metric": "fid"}
    save_best_fid(tmp_path, {"ema": {"w": torch.ones(2)}}, record)
    assert read_best_fid(tmp_path) == record

    path, _ = best_fid_paths(tmp_path)
    marker = tmp_path / "MARKER"
    torch.save({"fid": _Payload(marker)}, path)
    with pytest.raises(CheckpointError) as e:
        read_best_fid(tmp_path)
    assert "will not unpickle" in str(e.value) and str(path) in str(e.value)
    assert not marker.exists()
