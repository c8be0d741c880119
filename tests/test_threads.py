"""Thread choice: small networks run on one intra-op thread unless told otherwise."""

import os
import subprocess
import sys

import torch

from helpers import TINY
from soflow.run.load import load_run
from soflow.threads import SMALL_NETWORK, available_cores, choose_threads


def test_choice_by_setting_environment_and_size(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_threads(0, SMALL_NETWORK - 1) == 1
    assert choose_threads(0, SMALL_NETWORK) == available_cores()
    assert choose_threads(3, 10) == 3  # an explicit setting wins
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # torchrun's per-rank choice is kept
    assert choose_threads(0, 10) is None and choose_threads(1, 10) == 1


def _train_log(tmp_path, *extra):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    run = tmp_path / f"run{len(extra)}"
    subprocess.run([sys.executable, "-m", "soflow", "train", "--config", "toy2d", "--run-dir", str(run), *TINY,
                    "--set", "train.total_steps=2", *extra], check=True, capture_output=True, env=env, timeout=300)
    return (run / "log.txt").read_text()


def test_trainer_and_sampler_use_one_thread_for_the_toy_unless_set(tmp_path, monkeypatch):
    assert "cpu: 1 intra-op thread per process (train.threads=0)" in _train_log(tmp_path)
    assert "cpu: 2 intra-op threads per process (train.threads=2)" in _train_log(tmp_path, "--set", "train.threads=2")
    # Opening a run for sampling or evaluation applies the run's choice too.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        load_run(tmp_path / "run0")
        assert torch.get_num_threads() == 1
        load_run(tmp_path / "run2")  # trained with train.threads=2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
