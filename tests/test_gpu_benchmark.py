"""`benchmarks/gpu.py --smoke`: the GPU benchmark's code paths on the CPU (tiny DiTs), so that the
script a GPU owner runs as is cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = {"flow_matching", "soflow", "soflow_ratio075", "meanflow"}


def test_gpu_benchmark_smoke_writes_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["smoke"] and doc["skipped"] == []
    settings = {(e["size"], e["precision"], e["compile"]) for e in doc["training"]}
    assert settings == {(s, p, False) for s in ("dit-b2", "dit-xl2") for p in ("tf32", "bf16")} | \
        {(s, "bf16", True) for s in ("dit-b2", "dit-xl2")}
    for e in doc["training"]:
        assert "error" not in e, e  # MeanFlow's JVP included: traced by the compiler, sharded by FSDP
        assert e["iters_per_s"] > 0 and e["peak_memory_gb"] is None  # no CUDA memory on a CPU
        assert e["fsdp"] == (e["size"] == "dit-xl2")  # XL/2 goes through fully_shard (1-process group)
    assert {e["method"] for e in doc["training"]} == METHODS and len(doc["training"]) == 6 * len(METHODS)
    assert sorted((e["size"], e["nfe"]) for e in doc["sampling"]) == [("dit-b2", 1), ("dit-b2", 2),
                                                                      ("dit-xl2", 1), ("dit-xl2", 2)]
    assert all(e["images_per_s"] > 0 for e in doc["sampling"])
    run = doc["b4_run"]
    assert run["steps"] == 60 and run["loss_fell"] and run["loss_last_third"] < run["loss_first_third"]
    assert doc["paper"]["meanflow"] == {"iters_per_s": 2.39, "memory_gb": 51.45}


def test_gpu_benchmark_without_a_gpu_or_with_a_missing_vae_says_so_in_one_line(tmp_path):
    script = str(REPO / "benchmarks" / "gpu.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    full = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120, env=env)
    assert full.returncode == 2 and full.stderr.strip() == ("gpu.py: no CUDA device; run with --smoke to check the "
                                                            "script on the CPU")
    vae = subprocess.run([sys.executable, script, "--smoke", "--vae", str(tmp_path / "missing")], capture_output=True,
                         text=True, timeout=120, env=env)
    assert vae.returncode == 2 and len(vae.stderr.strip().splitlines()) == 1 and "missing" in vae.stderr, vae.stderr
