"""Run under torchrun: trains toy2d and records a hash of the weights after every step."""

import hashlib
import json
import os
import sys

from soflow.run.config import load
from soflow.train.loop import train

run_dir, out_dir, steps, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
cfg = load("toy2d", ["model.net_args={hidden: 32, depth: 1}", "train.batch_size=64", f"train.total_steps={steps}",
                     "train.log_every=2", "train.sample_num=100", "train.sample_nfe=[1]", *extra])
hashes = []


def record(step, flow):
    full = (p.full_tensor() if hasattr(p, "full_tensor") else p for p in flow.net.parameters())
    blob = b"".join(p.detach().cpu().numpy().tobytes() for p in full)
    hashes.append(hashlib.sha256(blob).hexdigest())


train(cfg, run_dir, on_step=record)
with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(hashes, f)
