"""How many intra-op CPU threads a job should use.

A small network gains nothing from several intra-op threads: each of its tiny operations ends in
an OpenMP barrier, and when other processes hold the cores the waiting threads spin there instead
of working (on a busy 2-core machine a toy run slowed from minutes to over an hour). Such networks
run on one thread; large ones use every core the process may run on.
"""

from __future__ import annotations

import os

import torch

SMALL_NETWORK = 1_000_000  # parameters; the toy MLPs have ~1e4-1e5, the CPU-sized image DiTs ~2e6


def available_cores() -> int:
    """The number of CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def choose_threads(setting: int, num_params: int) -> int | None:
    """The thread count to use, or None to keep what the environment asked for.

    setting > 0 is used as given. setting 0 (auto) keeps an explicit OMP_NUM_THREADS (torchrun sets
    it to 1 per rank), and otherwise gives small networks one thread and large ones every core.
    """
    if setting > 0:
        return setting
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return 1 if num_params < SMALL_NETWORK else available_cores()


def configure_threads(setting: int, net: torch.nn.Module, device: torch.device) -> int:
    """Apply `choose_threads` to `net` (CPU jobs only) and return the intra-op thread count in use."""
    if device.type == "cpu":
        n = choose_threads(setting, sum(p.numel() for p in net.parameters()))
        if n is not None and n != torch.get_num_threads():
            torch.set_num_threads(n)
    return torch.get_num_threads()
