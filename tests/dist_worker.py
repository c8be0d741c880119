"""Run under torchrun: trains toy2d and records a hash of the weights after every step.

KILL_RANK, KILL_AT_STEP and KILL_MARK (environment) make that rank kill itself with SIGKILL right
after that optimizer step, once: the file KILL_MARK, made just before, says it happened (torchrun's
restart count cannot: each node's agent keeps its own). RESTART_DELAY_RANK makes that rank start
2 s late once the kill has happened, so that the other ranks of the new round meet the store first.
Without torchrun it is the one process of a run."""

import hashlib
import json
import os
import signal
import sys
import time

from soflow.run.config import load
from soflow.train.loop import train

run_dir, out_dir, steps, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
cfg = load("toy2d", ["model.net_args={hidden: 32, depth: 1}", "train.batch_size=64", f"train.total_steps={steps}",
                     "train.log_every=2", "train.sample_num=100", "train.sample_nfe=[1]", *extra])
hashes = []
rank = os.environ.get("RANK", "0")
kill_mark = os.environ.get("KILL_MARK")
kill_at = int(os.environ.get("KILL_AT_STEP", "0")) if os.environ.get("KILL_RANK") == rank else 0
if kill_mark and os.path.exists(kill_mark) and os.environ.get("RESTART_DELAY_RANK") == rank:
    time.sleep(2)


def record(step, flow):
    full = (p.full_tensor() if hasattr(p, "full_tensor") else p for p in flow.net.parameters())
    blob = b"".join(p.detach().cpu().numpy().tobytes() for p in full)
    hashes.append(hashlib.sha256(blob).hexdigest())
    if step == kill_at and not os.path.exists(kill_mark):
        open(kill_mark, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


train(cfg, run_dir, on_step=record)
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(hashes, f)
