"""Real torchrun processes (gloo on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from soflow.run.checkpoint import list_checkpoints, read_checkpoint

WORKER = Path(__file__).parent / "dist_worker.py"


def torchrun(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("method", ["soflow", "meanflow"])
def test_two_ranks_keep_identical_weights_after_every_step(tmp_path, method):
    proc = torchrun(WORKER, tmp_path / "run", tmp_path, 6, f"method={method}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert len(r0) == 6 and r0 == r1
    assert len(set(r0)) == 6  # the weights do move
    ckpt = read_checkpoint(list_checkpoints(tmp_path / "run")[0][1])
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not all((a == b).all() for a, b in zip(ckpt["rng"][0].values(), ckpt["rng"][1].values()))


def test_fsdp_matches_ddp_and_resumes(tmp_path):
    ddp = torchrun(WORKER, tmp_path / "ddp", tmp_path, 6)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    out = tmp_path / "fsdp_out"
    out.mkdir()
    first = torchrun(WORKER, tmp_path / "fsdp", out, 6, "train.fsdp=true", "train.checkpoint_every=3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((out / "rank0.json").read_text()) == json.loads((out / "rank1.json").read_text())
    a = read_checkpoint(list_checkpoints(tmp_path / "ddp")[0][1])
    b = read_checkpoint(list_checkpoints(tmp_path / "fsdp")[0][1])
    assert a["step"] == b["step"] == 6
    for key in ("net", "ema"):
        for name, value in a[key].items():
            assert torch.allclose(value, b[key][name], atol=1e-5), f"{key}/{name}"
    # resume the sharded run from its step-3 checkpoint: same end point
    (list_checkpoints(tmp_path / "fsdp")[0][1]).unlink()
    again = torchrun(WORKER, tmp_path / "fsdp", out, 6, "train.fsdp=true", "train.checkpoint_every=3")
    assert again.returncode == 0, again.stderr[-3000:]
    c = read_checkpoint(list_checkpoints(tmp_path / "fsdp")[0][1])
    for name, value in b["net"].items():
        assert torch.equal(value, c["net"][name]), name
