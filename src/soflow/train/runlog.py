"""Run output: status lines (console + log.txt), metrics.jsonl, optional TensorBoard, progress bar.

What a run prints on stdout, terminal or not: one status line before the first step (what trains,
where, how big, where the log is), then every `train.log_every` steps a metrics line with the step
out of the total and the estimated time left, and the absolute path of every sample figure.  A
terminal also gets a progress bar on stderr.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from ..errors import ConfigError
from ..plots import plural  # noqa: F401  (the trainer's modules take it from here)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..run.config import Config


class _NoProgress:
    def update(self, n):
        pass

    def close(self):
        pass


class RunLog:
    """A run's log.txt, metrics.jsonl, progress bar and TensorBoard (rank 0 writes; others are disabled)."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = False):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.writer = None
        self._bar = None
        self._total = None  # set by start(): metrics lines then show step/total and the time left
        self._clock = None  # (step, time) at start(), for the time left
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.run_dir / "log.txt", "a")
        self._metrics = open(self.run_dir / "metrics.jsonl", "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard needs the tensorboard package: pip install 'soflow[tensorboard]'") from None
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def _emit(self, line: str, stream) -> None:
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log.write(f"[{stamp}] {line}\n")
        self._log.flush()
        if self._bar is not None:
            self._bar.write(line, file=stream)
        else:
            print(line, file=stream, flush=True)

    def info(self, line: str) -> None:
        self._emit(line, sys.stdout)

    def warn(self, line: str) -> None:
        self._emit(line, sys.stderr)

    def save_config(self, text: str) -> None:
        if self.enabled:
            (self.run_dir / "config.yaml").write_text(text)

    def start(self, cfg: Config, step: int, net: nn.Module, device: torch.device, world: int = 1) -> tqdm | _NoProgress:
        """Print the run's first status line, before any step (the first metrics line can be minutes
        away), and return the progress bar of steps step..total."""
        t = cfg.train
        params = sum(p.numel() for p in net.parameters())
        where = f"{world} x {device}" if world > 1 else str(device)
        self.info(f"training {cfg.method} on {cfg.data.name} ({cfg.model.net}): step {step}/{t.total_steps} on "
                  f"{where}, {params:,} parameters, batch {t.batch_size}; logs in {self.run_dir.resolve() / 'log.txt'}")
        self._total, self._clock = t.total_steps, (step, time.perf_counter())
        return self.progress(step, t.total_steps)

    def samples(self, path: str | Path) -> None:
        """Say where a sample figure was written (absolute: the run may have been started elsewhere)."""
        self.info(f"samples written to {Path(path).resolve()}")

    def progress(self, start: int, total: int) -> tqdm | _NoProgress:
        if not self.enabled or not sys.stderr.isatty():
            return _NoProgress()
        self._bar = tqdm(total=total, initial=start, dynamic_ncols=True, leave=False)
        return self._bar

    def metrics(self, step: int, values: dict, **extra) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values, **extra}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self.writer is not None:
            for k, v in record.items():
                if k != "step":
                    self.writer.add_scalar(k, v, step)
        first = ["loss", "velocity_mse", "velocity_weight", "consistency_mse", "consistency_weight", "r"]
        last = ["grad_norm", "samples_per_s", "peak_cuda_allocated_gb", "peak_rss_gb"]
        middle = [k for k in record if k not in first + last + ["step"]]
        parts = [f"{k} {record[k]:.4g}" for k in first + middle + last if k in record]
        self.info(f"{self._where(step)} | " + " | ".join(parts))

    def _where(self, step: int) -> str:
        """'step 500/4000, 1m 05s left' once start() knows the total (the rate is the mean since start)."""
        if self._total is None:
            return f"step {step}"
        done, started = step - self._clock[0], self._clock[1]
        text = f"step {step}/{self._total}"
        if 0 < done and step < self._total:
            text += f", {_duration((time.perf_counter() - started) / done * (self._total - step))} left"
        return text

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.writer is not None:
            self.writer.close()
        self._log.close()
        self._metrics.close()


def _duration(seconds: float) -> str:
    """'42s', '3m 05s', '2h 07m'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"
