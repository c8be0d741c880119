"""Feed random bytes and random mutations of real soflow files to every reader of files from
others: safetensors exports, pipeline folders (config.json), run checkpoints and YAML configs.

Run as `python fuzz_readers.py WORKDIR CASES SEED` (tests/test_fuzz.py does); once the real files
are written, the process caps its address space at 2 GB more than it maps.  Each case must end in success or one soflow error of one line, within
HANG_S seconds.  Prints one line per failure and, last, "cases N failures M"."""

import random
import shutil
import signal
import struct
import sys
from pathlib import Path

import torch

from soflow import Pipeline, SolutionFlow
from soflow.errors import SoflowError
from soflow.nets import build
from soflow.run.checkpoint import FORMAT, atomic_save, run_state
from soflow.run.config import load
from soflow.run.presets import PRESET_DIR

HANG_S = 10
ALLOWED = 2 << 30  # bytes of address space a case may add to what the process already maps


def cap_memory(extra: int) -> None:
    """Cap the address space at what is mapped now plus `extra`: a reader that tries to allocate
    more fails (MemoryError or a RuntimeError), which counts as a failure of the case."""
    import resource

    mapped = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                  if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra, resource.getrlimit(resource.RLIMIT_AS)[1]))


class Hang(Exception):
    pass


def originals(work: Path) -> dict[str, bytes]:
    """Real files of each kind, written by soflow itself."""
    cfg = load(base={"model": {"net_args": {"hidden": 16, "depth": 1}}})
    pipe = Pipeline(SolutionFlow(build("mlp", dim=2, hidden=16, depth=1)), cfg, step=5)
    folder = pipe.save_pretrained(work / "original", grid=False)
    state = pipe.flow.net.state_dict()
    ckpt = work / "ckpt-00000005.pt"
    atomic_save({"format": FORMAT, **run_state(5, cfg.to_dict(), [2], 0, state, state)}, ckpt)
    return {"export": (folder / "model.safetensors").read_bytes(), "config.json": (folder / "config.json").read_bytes(),
            "checkpoint": ckpt.read_bytes(), "yaml": (PRESET_DIR / "toy2d.yaml").read_bytes(),
            "_folder": folder}


def mutate(data: bytes, rng: random.Random, header: int = 0) -> bytes:
    """Random bytes, a truncation, or a few changed, inserted or deleted bytes (within the first
    `header` bytes half of the time: where a format's description lies)."""
    kind = rng.choice(["random", "truncate", "flip", "flip", "insert", "delete", "digits"])
    if kind == "random":
        return bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 7, 8, 64, 1000])))
    if kind == "truncate":
        return data[:rng.randrange(len(data) + 1)]
    out = bytearray(data)
    span = header if header and rng.random() < 0.5 else len(out)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(max(1, min(span, len(out))))
        if kind == "flip" and out:
            out[i] = rng.getrandbits(8)
        elif kind == "insert":
            out[i:i] = rng.choice([b"9" * rng.randint(1, 30), b"-", b"&a ", b"*a", b"[", b"{", b"\xff", b"e999"])
        elif kind == "delete":
            del out[i:i + rng.randint(1, 8)]
        elif kind == "digits" and out:
            digits = [j for j in range(min(span, len(out))) if 48 <= out[j] <= 57]
            if digits:
                out[rng.choice(digits)] = ord(rng.choice("0123456789"))
                j = rng.choice(digits)
                out[j:j + 1] = b"9" * rng.randint(1, 12)
    return bytes(out)


def safetensors_header_size(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0


def read(kind: str, data: bytes, work: Path, originals: dict) -> None:
    """Write `data` where a reader of `kind` finds it, and read it."""
    case = work / "case"
    shutil.rmtree(case, ignore_errors=True)
    if kind in ("export", "config.json"):
        shutil.copytree(originals["_folder"], case)
        (case / ("model.safetensors" if kind == "export" else "config.json")).write_bytes(data)
        Pipeline.from_pretrained(case)
        if kind == "export":
            Pipeline.from_pretrained(case / "model.safetensors")
    elif kind == "checkpoint":
        (case / "checkpoints").mkdir(parents=True)
        (case / "checkpoints" / "ckpt-00000005.pt").write_bytes(data)
        Pipeline.from_pretrained(case)
    else:
        case.mkdir()
        (case / "c.yaml").write_bytes(data)
        load(str(case / "c.yaml"))


def one_case(kind: str, data: bytes, work: Path, originals: dict) -> str | None:
    """None if the reader succeeded or refused in one soflow line, else what went wrong."""
    def alarm(signum, frame):
        raise Hang()

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(HANG_S)
    try:
        read(kind, data, work, originals)
    except SoflowError as e:
        if len(str(e).strip().splitlines()) != 1:
            return f"a soflow error of {len(str(e).splitlines())} lines: {str(e)[:200]!r}"
    except Hang:
        return f"no answer within {HANG_S} s"
    except BaseException as e:  # noqa: BLE001 (what the fuzzer looks for)
        return f"{type(e).__name__}: {str(e).strip()[:200]!r}"
    finally:
        signal.alarm(0)
    return None


def main(work: str, cases: str, seed: str) -> int:
    work = Path(work)
    torch.set_num_threads(1)
    files = originals(work)
    cap_memory(ALLOWED)
    rng = random.Random(int(seed))
    kinds = ["export", "config.json", "checkpoint", "yaml"]
    failures = 0
    for n in range(int(cases)):
        kind = kinds[n % len(kinds)]
        header = safetensors_header_size(files[kind]) if kind == "export" else 512
        data = mutate(files[kind], rng, header)
        problem = one_case(kind, data, work, files)
        if problem:
            failures += 1
            (work / f"failure-{n}-{kind.replace('.', '_')}.bin").write_bytes(data)
            print(f"case {n} ({kind}): {problem}", flush=True)
    print(f"cases {cases} failures {failures}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
