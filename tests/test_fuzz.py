"""Random bytes and random mutations of a real export, pipeline config.json, run checkpoint and
YAML config, fed to every reader (tests/fuzz_readers.py): no traceback, no hang over 10 s, no
allocation over 2 GB."""

import subprocess
import sys
from pathlib import Path

import pytest

FUZZER = Path(__file__).with_name("fuzz_readers.py")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="the memory cap reads /proc (Linux)")
def test_readers_survive_random_and_mutated_files(tmp_path):
    import os

    proc = subprocess.run([sys.executable, str(FUZZER), str(tmp_path), "400", "23"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "cases 400 failures 0", proc.stdout[-3000:]
