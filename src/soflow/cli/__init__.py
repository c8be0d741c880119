"""`soflow` command line.

Commands (`soflow COMMAND --help` has the options and examples of each):

- `train`: train a model from a preset or YAML into a run folder, or resume it;
- `sample`: draw samples from a run into a .png, .npz, .npy or a folder of PNGs;
- `export`: write a run as a pipeline folder in the Hugging Face layout (`soflow.Pipeline`);
- `encode-latents`: encode an image folder into SD-VAE latent shards;
- `fid ref` / `fid calc`: Inception statistics of reference images / FID (sFID, IS, precision/recall);
- `eval points` / `eval fmnist`: score a 2-D run / a Fashion-MNIST run;
- `convert-reference`: turn an authors' checkpoint and YAML into a soflow run folder;
- `env`: versions, devices, threads and optional packages, for a bug report.

`soflow --version` prints the version.  Bad input ends a command with one line on stderr and exit
status 2 (SOFLOW_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import os
import sys

from ..errors import SoflowError
from .parser import build_parser

# OS errors about a path the user gave (a missing file, a read-only or occupied destination): bad
# input like a SoflowError, printed as "PATH: reason".
PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SoflowError, *PATH_ERRORS) as e:  # bad input; anything else is a fault and keeps its traceback
        if os.environ.get("SOFLOW_DEBUG"):
            raise
        # an OS error reads "PATH: reason" (a path the user gave); every message is kept on one line
        text = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        text = " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__
        print(f"soflow {args.command}: error: {text}", file=sys.stderr)
        return 2

