"""Reading model files that anyone may have written: tensors and plain values only, never code.

Unpickling a file runs whatever functions its pickle names, so soflow reads every torch file with
``weights_only=True`` (PyTorch's restricted unpickler) and safetensors files with the safetensors
parser. A refusal is reported in one line of soflow's own words. PyTorch's own refusal suggests
loading the file again with the protection turned off when it comes "from a trusted source"; soflow
never passes that on: a file that needs it holds more than tensors, so it is not a file that soflow
wrote or can use.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import UnreadableFile

# Phrases of PyTorch's refusal that advise turning the protection off; no message repeats them.
_ADVICE = re.compile(r"weights_only|trust", re.IGNORECASE)
_GLOBAL = re.compile(r"GLOBAL (\S{1,120})")


def describe(e: BaseException) -> str:
    """A short one-line reason for a failed read, never quoting advice to drop the protection."""
    text = str(e).strip()
    if isinstance(e, EOFError) or "unexpected eof" in text.lower():
        return "empty or truncated file"
    if "central directory" in text or "zip archive" in text or "incomplete metadata" in text:
        return "truncated or damaged file"
    first = text.splitlines()[0].strip() if text else ""
    if not first or _ADVICE.search(text):
        return type(e).__name__
    return f"{type(e).__name__}: {first[:160]}"


def _refusal(e: BaseException) -> UnreadableFile:
    named = _GLOBAL.search(str(e))
    what = named.group(1).rstrip(".") if named else ""
    if what and not _ADVICE.search(what):
        return UnreadableFile(f"it holds Python objects ({what}) that soflow will not unpickle; "
                              "only tensors and plain values are read", holds_objects=True)
    return UnreadableFile("it is a pickle that soflow will not unpickle; only tensors and plain values "
                          "saved with torch.save are read", holds_objects=True)


# A torch file is a zip archive (torch.save's format since 1.6) or, in the legacy format, a pickle
# of protocol 2 or later; anything shorter than a zip's smallest header is no torch file either.
_TORCH_HEADS, _SMALLEST = (b"PK\x03\x04", b"\x80"), 22


def _check_torch_head(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(_SMALLEST)
    except OSError as e:
        raise UnreadableFile(e.strerror or type(e).__name__) from None
    if len(head) < _SMALLEST:
        raise UnreadableFile(f"empty or truncated file ({len(head)} byte{'' if len(head) == 1 else 's'})")
    if not head.startswith(_TORCH_HEADS):
        raise UnreadableFile("not a torch file (it starts with neither a zip nor a pickle header)")


def load_torch(path: str | Path, mmap: bool = False, allow: tuple[type, ...] = ()) -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)``; any failure is
    :class:`UnreadableFile` with a one-line reason.  mmap=True maps the tensors instead of reading
    them (for files opened only for their plain values).  `allow` names plain data classes the
    restricted unpickler may rebuild besides tensors (attributes only, no code runs): SiT's
    checkpoints hold an ``argparse.Namespace``."""
    _check_torch_head(Path(path))
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(allow)):
            # PyTorch warns on stderr about some pickle protocols; the caller reports in one line.
            warnings.simplefilter("ignore")
            return torch.load(Path(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise _refusal(e) from None
    except Exception as e:
        raise UnreadableFile(describe(e), holds_objects=False) from None


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file on the CPU; any failure is :class:`UnreadableFile`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:
        raise UnreadableFile(describe(e), holds_objects=False) from None


def safetensors_header(path: str | Path) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """(metadata, {name: (dtype, shape)}) of a safetensors file, from its header alone: no tensor
    data is read, so a file's description can be checked before anything is built from it.  The
    safetensors parser checks that every tensor's byte range lies inside the file, so the shapes
    are bounded by the file's size.  Any failure is :class:`UnreadableFile`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            shapes = {}
            for k in f.keys():
                view = f.get_slice(k)
                shapes[k] = (str(view.get_dtype()), tuple(int(n) for n in view.get_shape()))
            return meta, shapes
    except Exception as e:
        raise UnreadableFile(describe(e), holds_objects=False) from None
