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

import errno
import os
import sys
from typing import Sequence

from ..errors import SoflowError
from .parser import build_parser

# OS errors about a path the user gave (a missing file, a read-only or occupied destination): bad
# input like a SoflowError, printed as "PATH: reason".
PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError)
PATH_ERRNOS = (errno.ENAMETOOLONG, errno.ELOOP)  # a name too long, a loop of symbolic links


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `soflow` command line on `argv` (default: sys.argv); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SoflowError, OSError) as e:  # bad input; anything else is a fault and keeps its traceback
        if os.environ.get("SOFLOW_DEBUG") or not _bad_input(e):
            raise
        # an OS error reads "PATH: reason" (a path the user gave); every message is kept on one line
        text = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        text = " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__
        print(f"soflow {args.command}: error: {text}", file=sys.stderr)
        return 2


def _bad_input(e: BaseException) -> bool:
    return isinstance(e, (SoflowError, *PATH_ERRORS)) or (isinstance(e, OSError) and e.errno in PATH_ERRNOS)
