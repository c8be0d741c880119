"""Run output: status lines (console + log.txt), metrics.jsonl, optional TensorBoard, progress bar."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .config import ConfigError


class _NoProgress:
    def update(self, n):
        pass

    def close(self):
        pass


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = False):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.writer = None
        self._bar = None
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

    def progress(self, start: int, total: int):
        if not self.enabled or not sys.stderr.isatty():
            return _NoProgress()
        from tqdm import tqdm

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
        last = ["grad_norm", "samples_per_s", "peak_memory_gb"]
        middle = [k for k in record if k not in first + last + ["step"]]
        parts = [f"{k} {record[k]:.4g}" for k in first + middle + last if k in record]
        self.info(f"step {step} | " + " | ".join(parts))

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
