"""`soflow env`, run in-process: every line a bug report needs, and the same facts as JSON."""

import json

import torch

import soflow
from soflow.cli import main


def test_env_reports_versions_devices_threads_and_packages(capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    lines = dict(line.split(": ", 1) for line in text.splitlines())
    assert lines["soflow"] == soflow.__version__ and lines["torch"] == torch.__version__
    assert lines["cuda"] == str(torch.version.cuda)
    for key in ("python", "platform", "cudnn", "nccl", "cpu", "threads", "distributed", "packages", "environment"):
        assert lines[key], key
    assert f"{torch.get_num_threads()} intra-op" in lines["threads"]
    assert "gloo yes" in lines["distributed"]
    assert "torch-fidelity" in lines["packages"] and "diffusers" in lines["packages"]
    assert "OMP_NUM_THREADS=3" in lines["environment"]
    gpus = [k for k in lines if k.startswith("gpu")]
    assert len(gpus) == max(1, torch.cuda.device_count())  # "gpu: none visible to torch" on a CPU machine

    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["soflow"] == soflow.__version__ and info["torch"] == torch.__version__
    assert info["devices"]["cpu_cores"] >= 1 and len(info["devices"]["cuda"]) == torch.cuda.device_count()
    assert info["threads"]["intra_op"] == torch.get_num_threads()
    assert set(info["packages"]) >= {"diffusers", "h5py", "torchvision", "torch-fidelity", "tensorboard"}
    assert info["environment"]["OMP_NUM_THREADS"] == "3"
