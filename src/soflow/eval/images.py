"""Reading image and array files for evaluation: ``.npz`` archives (numeric arrays only, never
pickles) and folders of PNG/JPEG images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import EvalError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def npz_keys(path: str | Path) -> list[str]:
    """The array names in an ``.npz`` file (nothing is read)."""
    path = Path(path)
    with _open_npz(path) as z:
        return list(z.files)


def _open_npz(path: Path):
    if not path.is_file():
        raise EvalError(f"{path}: no such file")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:
        raise EvalError(f"{path}: not a readable .npz file ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise EvalError(f"{path}: a single .npy array, not an .npz archive")
    return z


def _read_array(z, key: str, path: Path) -> np.ndarray:
    """One array of an open ``.npz``. Object arrays are pickles, which soflow does not load."""
    try:
        a = z[key]
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise EvalError(f"{path}: {key} holds Python objects, which soflow will not unpickle; "
                            "expected a numeric array") from None
        raise EvalError(f"{path}: {key} is unreadable ({type(e).__name__}: {_first_line(e)[:160]})") from None
    except Exception as e:  # a damaged or truncated member
        raise EvalError(f"{path}: {key} is unreadable ({type(e).__name__}: {_first_line(e)[:160]})") from None
    if a.dtype.hasobject or a.dtype.kind not in "biuf":
        raise EvalError(f"{path}: {key} has dtype {a.dtype}; expected a numeric array")
    return a


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def _check_images(images) -> Tensor:
    x = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
    if not torch.is_tensor(x) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[0] < 1:
        desc = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"expected uint8 images [N, 1 or 3, H, W], got {desc}")
    return x


def load_images(src: str | Path) -> Tensor:
    """uint8 images [N, 3, H, W] (or [N, 1, H, W] for a grayscale ``.npz``) from SRC:

    - a folder: every .png/.jpg/.jpeg below it (recursively), sorted by relative path, converted
      to RGB; all must have the same size;
    - an ``.npz`` whose ``arr_0`` is uint8 [N, H, W, C] (ADM's sample format), C in {1, 3}.
    """
    src = Path(src)
    if src.is_dir():
        return _load_folder(src)
    if src.suffix.lower() == ".npz" or src.is_file():
        with _open_npz(src) as z:
            if "arr_0" not in z.files:
                raise EvalError(f"{src}: no arr_0 (found {', '.join(z.files) or 'nothing'}); expected uint8 NHWC "
                                "images in arr_0")
            arr = _read_array(z, "arr_0", src)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3) or arr.shape[0] < 1:
            raise EvalError(f"{src}: arr_0 is {arr.dtype} {arr.shape}; expected uint8 [N, H, W, 1 or 3]")
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
    raise EvalError(f"{src}: no such folder or .npz file")


def _load_folder(folder: Path) -> Tensor:
    from PIL import Image

    files = sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise EvalError(f"{folder}: no .png/.jpg/.jpeg images found")
    out = None
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as e:
            raise EvalError(f"{f}: cannot read image ({type(e).__name__}: {_first_line(e)})") from None
        if out is None:
            out = np.empty((len(files), *arr.shape), np.uint8)
        elif arr.shape != out.shape[1:]:
            raise EvalError(f"{f}: size {arr.shape[1]}x{arr.shape[0]} differs from "
                            f"{out.shape[2]}x{out.shape[1]} of {files[0]}")
        out[i] = arr
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
