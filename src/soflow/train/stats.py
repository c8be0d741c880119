"""Running training statistics between two metric lines.

The sums stay on the device so that an optimizer step never waits for the host; they are read
(one all-reduce) only when a metric line is written.
"""

from __future__ import annotations

import time

import torch

from .. import distributed


class RunningStats:
    """Sums of the per-step statistics since the last flush, and the first non-finite step."""

    def __init__(self, total_steps: int, batch_size: int, device: torch.device):
        # total_steps + 1 stands for "every loss so far was finite" (no step can have that number)
        self._first_bad = torch.full((), total_steps + 1, dtype=torch.long, device=device)
        self.batch_size = batch_size  # the global batch: samples/s counts every rank's samples
        self._restart()

    def _restart(self) -> None:
        self.totals, self.count, self.timer = {}, 0, time.perf_counter()

    @property
    def first_bad(self) -> torch.Tensor:
        """The first step whose loss was not finite, or total_steps + 1 (a device tensor: reading
        it is a host sync, so the loop reads it only at a boundary)."""
        return self._first_bad

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, stats: dict) -> None:
        """Add the optimizer step that ended at `step`; no host sync."""
        loss = loss.detach()
        self._first_bad = torch.where(torch.isfinite(loss), self._first_bad, self._first_bad.clamp(max=step))
        for k, v in {"loss": loss, "grad_norm": grad_norm, **stats}.items():
            self.totals[k] = self.totals.get(k, 0) + v.float()
        self.count += 1

    def flush(self, env: distributed.Env) -> dict:
        """The means since the last flush, averaged over ranks (a collective: every rank calls it),
        then samples_per_s; the sums and the timer restart."""
        elapsed = time.perf_counter() - self.timer
        means = {}
        if self.totals:
            keys = sorted(self.totals)
            values = distributed.mean_over_ranks(env, torch.stack([self.totals[k] for k in keys]) / self.count)
            means = dict(zip(keys, values.tolist()))
        means["samples_per_s"] = self.count * self.batch_size / elapsed
        self._restart()
        return means


def peak_memory_gb(device: torch.device) -> dict:
    """Peak memory under a name that says what was measured: the tensors allocated on the CUDA
    device, or the resident set of the whole process (ru_maxrss, kB on Linux) on CPU."""
    if device.type == "cuda":
        return {"peak_cuda_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# Optimizer settings that come from the config: train.lr, train.betas, train.weight_decay, and
# train.optimizer (AdamW decouples its weight decay, RAdam does not).
