"""Image metrics: Fréchet Inception Distance, sFID, Inception Score, precision and recall.

Features come from torch-fidelity's ``inception-v3-compat`` network (the TensorFlow InceptionV3
graph used by the original FID code and by ADM's evaluator, ported to PyTorch), loaded from a local
weights file so that nothing is downloaded. ``pool`` features (``'2048'``) give FID and precision /
recall; the ``'logits_unbiased'`` output gives the Inception Score; ``'spatial'`` (ADM's
``mixed_6/conv`` features) gives sFID. The weights file is read by soflow itself, tensors only
(:func:`load_inception_weights`): torch-fidelity's own loader unpickles it with
``weights_only=False``, which would run any code the file names.

Statistics are plain ``.npz`` files with the keys ``mu`` (D,) and ``sigma`` (D, D), which is also
the layout of ADM's reference batches (e.g. ``VIRTUAL_imagenet256_labeled.npz``), so those are read
as they are. Optional keys: ``mu_s`` and ``sigma_s`` (spatial statistics for sFID, as ADM names
them) and ``features`` (the feature vectors themselves, float32 [N, D], for precision and recall;
ADM's reference batches hold the reference *images* in ``arr_0`` instead, and their features are
computed when needed, as ADM's evaluator does). Samples are either a folder of PNG/JPEG files or an
ADM-style ``.npz`` whose ``arr_0`` is uint8 NHWC (what ``soflow sample --out X.npz`` writes).
"""

from __future__ import annotations

import functools
import io
import os
import zipfile
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import EvalError, UnreadableFile

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "SOFLOW_INCEPTION_WEIGHTS"
# torch-fidelity's release of the converted TensorFlow weights (same tensors as WEIGHTS_FILE).
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Feature sizes of the Inception layers (torch-fidelity's names) and of ADM's spatial features.
SPATIAL = "spatial"
SPATIAL_CHANNELS, SPATIAL_SIZE = 7, 17
LAYER_DIMS = {"64": 64, "192": 192, "768": 768, "2048": 2048, SPATIAL: SPATIAL_CHANNELS * SPATIAL_SIZE ** 2}
# torch-fidelity's feature names for its InceptionV3, and soflow's spatial features.
FEATURE_NAMES = ("64", "192", "768", "2048", "logits_unbiased", "logits", SPATIAL)

ImagesLike = Union[Tensor, np.ndarray, str, Path]
Stats = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------------------------
# Fréchet distance and statistics


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:

        d² = ||mu1 - mu2||² + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^{1/2})

    The matrix square root is ``scipy.linalg.sqrtm``. When the product is singular enough for the
    square root to come out non-finite, ``eps * I`` is added to both covariances and it is taken
    again; imaginary parts from rounding are dropped, and a clearly complex result (imaginary
    diagonal larger than 1e-3 relative to the real one) is an error. FID is this distance between
    the Gaussian fits of two sets of Inception pool features.
    """
    from scipy import linalg

    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
                         f"mu2 {mu2.shape}, sigma2 {sigma2.shape}")

    def sqrtm(a: np.ndarray) -> np.ndarray:
        out = linalg.sqrtm(a)
        return out[0] if isinstance(out, tuple) else out  # scipy < 1.16 with disp=False

    covmean = sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = eps * np.eye(d)
        covmean = sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        diag = np.diagonal(covmean)
        worst = np.max(np.abs(diag.imag))
        if worst > 1e-3 * max(1.0, np.max(np.abs(diag.real))):
            raise ValueError(f"frechet_distance: matrix square root has imaginary component {worst:.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def statistics(features) -> Stats:
    """Mean (D,) and unbiased covariance (D, D) of features [N, D], in float64."""
    f = features.detach().cpu().double().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"statistics: expected features [N >= 2, D], got shape {tuple(f.shape)}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def save_stats(path: str | Path, mu, sigma, *, mu_s=None, sigma_s=None, features=None) -> Path:
    """Write ``mu`` and ``sigma`` (float64) to an ``.npz`` file (the suffix is added if missing);
    optionally the spatial statistics ``mu_s``, ``sigma_s`` (sFID) and the ``features`` [N, D]
    themselves (float32, for precision and recall)."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if mu_s is not None:
        arrays.update(mu_s=np.asarray(mu_s, np.float64), sigma_s=np.asarray(sigma_s, np.float64))
    if features is not None:
        f = features.detach().cpu().numpy() if torch.is_tensor(features) else features
        arrays["features"] = np.asarray(f, np.float32)
    np.savez(path, **arrays)
    return path


def load_stats(path: str | Path, keys: tuple[str, str] = ("mu", "sigma")) -> Stats:
    """(mu, sigma) in float64 from an ``.npz`` with keys ``mu`` and ``sigma`` (other keys, like those
    of ADM's reference batches, are ignored). ``keys=("mu_s", "sigma_s")`` reads the spatial
    statistics of sFID instead."""
    path = Path(path)
    with _open_npz(path) as z:
        missing = [k for k in keys if k not in z.files]
        if missing:
            found = ", ".join(z.files) or "nothing"
            if keys[0] == "mu_s":
                raise EvalError(f"{path}: no spatial statistics for sFID (no {' or '.join(missing)}; found {found}); "
                                "write the reference with `soflow fid ref --sfid`")
            raise EvalError(f"{path}: not a statistics file: no {' or '.join(missing)} (found {found}); "
                            f"expected keys {keys[0]} and {keys[1]}")
        mu, sigma = (_read_array(z, k, path).astype(np.float64) for k in keys)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise EvalError(f"{path}: {keys[0]} {mu.shape} and {keys[1]} {sigma.shape} are not (D,) and (D, D)")
    return mu, sigma


def load_features(path: str | Path) -> np.ndarray:
    """The ``features`` [N, D] of a reference file (written by ``soflow fid ref --prc``)."""
    path = Path(path)
    with _open_npz(path) as z:
        if "features" not in z.files:
            raise EvalError(f"{path}: no features for precision/recall (found {', '.join(z.files) or 'nothing'}); "
                            "write the reference with `soflow fid ref --prc`, or use one with its images in arr_0")
        f = _read_array(z, "features", path)
    if f.ndim != 2 or f.shape[0] < 2 or f.dtype.kind not in "fiu":
        raise EvalError(f"{path}: features are {f.dtype} {f.shape}; expected numbers [N >= 2, D]")
    return f


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


# --------------------------------------------------------------------------------------------
# Inception Score


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Inception Score from classifier logits [N, C] (the unbiased Inception logits), in float64:

        IS = exp( E_x KL( p(y|x) || p(y) ) ),   p(y|x) = softmax(logits),  p(y) = mean_x p(y|x)

    computed on each of ``splits`` consecutive chunks (in the given order, no shuffling); returns
    the mean and the (population) standard deviation over the chunks.
    """
    z = logits.detach().cpu().double() if torch.is_tensor(logits) else torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if z.dim() != 2 or z.shape[0] < splits or splits < 1:
        raise ValueError(f"inception_score: expected logits [N >= splits, C] with splits >= 1, "
                         f"got shape {tuple(z.shape)} and splits={splits}")
    n = z.shape[0]
    log_p = torch.log_softmax(z, dim=1)
    p = log_p.exp()
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        pc, lpc = p[lo:hi], log_p[lo:hi]
        log_q = pc.mean(dim=0, keepdim=True).log()
        # Classes that no sample predicts have p = q = 0 and contribute nothing (0 log 0 = 0).
        kl = torch.where(pc > 0, pc * (lpc - log_q), torch.zeros_like(pc)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------
# Precision and recall


def precision_recall(real, fake, k: int = 3, batch_size: int = 10000) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Sec. 2) of feature sets
    ``real`` [N, D] and ``fake`` [M, D]:

        f(x, S) = 1  if  ||x - y|| <= ||y - NN_k(y, S)||  for some y in S,  else 0
        precision = mean over fake x of f(x, real),    recall = mean over real x of f(x, fake)

    where NN_k(y, S) is the k-th nearest neighbour of y in S other than y itself: each set's
    manifold is the union of balls reaching each point's k-th neighbour. k = 3 as in ADM's
    evaluator. Distances are computed in blocks of ``batch_size`` rows by torch-fidelity's
    ``calculate_precision_recall_part`` (the full N x M matrix is never held), in the features'
    dtype and on their device; numpy arrays become float32 tensors.
    """
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    real, fake = (_feature_tensor(x, name) for x, name in ((real, "real"), (fake, "fake")))
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall: real features have {real.shape[1]} dimensions, fake {fake.shape[1]}")
    if k < 1 or min(len(real), len(fake)) <= k:
        raise ValueError(f"precision_recall: k = {k} neighbours need more than k samples in each set "
                         f"(real {len(real)}, fake {len(fake)})")
    fake = fake.to(real.device, real.dtype)
    # torch-fidelity's convention: the first set is generated, the second real.
    precision, recall = calculate_precision_recall_part(fake, real, neighborhood=k, batch_size=batch_size)
    # Those are float32 means of 0/1 flags; as exact fractions (counts / set sizes) instead:
    return round(precision * len(fake)) / len(fake), round(recall * len(real)) / len(real)


def _feature_tensor(x, name: str) -> Tensor:
    t = x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x, np.float32))
    if t.dim() != 2 or not t.is_floating_point():
        raise ValueError(f"precision_recall: {name} features must be floats [N, D], got {t.dtype} {tuple(t.shape)}")
    return t


# --------------------------------------------------------------------------------------------
# Inception features


def default_weights_path() -> Path:
    """$SOFLOW_INCEPTION_WEIGHTS, or ~/.cache/soflow/pt_inception-2015-12-05-6726825d.pth."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "soflow" / WEIGHTS_FILE


def load_inception_weights(path: str | Path) -> dict[str, Tensor]:
    """The named tensors of an InceptionV3 weights file: a torch file (read with
    ``weights_only=True``: tensors and plain values only, no code runs) or a ``.safetensors`` file.
    Anything else is a one-line :class:`EvalError` naming the file."""
    from ..safeload import load_safetensors, load_torch

    path = Path(path)
    try:
        state = load_safetensors(path)[0] if path.suffix == ".safetensors" else load_torch(path)
    except UnreadableFile as e:
        if e.holds_objects:
            raise EvalError(f"{path}: not InceptionV3 weights: {e}") from None
        raise EvalError(f"{path}: not readable InceptionV3 weights ({e})") from None
    if not isinstance(state, dict):
        raise EvalError(f"{path}: not InceptionV3 weights: holds a {type(state).__name__}, expected named tensors")
    odd = [str(k) for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if odd:
        raise EvalError(f"{path}: not InceptionV3 weights: {odd[0][:80]!r} is not a named tensor")
    return dict(state)  # a plain dict: missing batch-norm step counters are then filled in on load


def _check_fit(net: torch.nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """Names and shapes of `state` against the network, in one line. The batch-norm step counters
    (num_batches_tracked) may be absent, as they are from torch-fidelity's converted weights."""
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    problems = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
               ([f"unexpected {', '.join(unexpected[:3])}"] if unexpected else []) + \
               ([f"shape {', '.join(wrong[:3])}"] if wrong else [])
    if problems:
        more = f" ({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of wrong shape)"
        raise EvalError(f"{path}: not InceptionV3 weights for torch-fidelity's network: {'; '.join(problems)}{more}")


@functools.lru_cache(maxsize=1)
def _network_class():
    """torch-fidelity's InceptionV3, built without loading weights.

    Its constructor reads the weights with ``torch.load(path, weights_only=False)``, which runs any
    code a file names. It is given an in-memory file holding an empty dict instead, whose loading
    is skipped; soflow then copies in the tensors that :func:`load_inception_weights` read safely.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class InceptionV3WithoutLoading(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            if len(state_dict) == 0:  # the constructor's placeholder: keep the initial values
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return InceptionV3WithoutLoading


def _empty_torch_file() -> io.BytesIO:
    buf = io.BytesIO()
    torch.save({}, buf)
    buf.seek(0)
    return buf


class InceptionFeatures:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` ('inception-v3-compat') on local weights.

    ``weights_path`` defaults to :func:`default_weights_path`; a missing file is a one-line
    ``FileNotFoundError`` that says where to put it, and a file that is not plain InceptionV3
    tensors (torch or ``.safetensors``) a one-line :class:`EvalError`. ``features`` are
    torch-fidelity feature names: the first one is what :meth:`__call__` returns (``'2048'``, the
    pool features of FID, by default); ``'logits_unbiased'`` is for the Inception Score. Asking only
    for an early layer (``'64'``, ``'192'``, ``'768'``) stops the network there.

    ``'spatial'`` gives ADM's sFID features: the first 7 channels of the TensorFlow graph's
    ``mixed_6/conv`` output, the 1x1 branch of the fourth 17x17 block (``Mixed_6d.branch1x1`` here,
    after its ReLU), flattened in ADM's NHWC order to 17 * 17 * 7 = 2023 values.

    Input: uint8 images [N, 3, H, W] or [N, 1, H, W] (grayscale is repeated to 3 channels), any
    size: the network resizes to 299x299 itself. Extraction runs in batches of ``batch_size``.
    """

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device | None = None,
                 batch_size: int = 64, features: Sequence[str] = ("2048", "logits_unbiased"),
                 dtype: str | None = None):
        path = Path(weights_path).expanduser() if weights_path is not None else default_weights_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights not found at {path}: download {WEIGHTS_URL} and save it as "
                f"~/.cache/soflow/{WEIGHTS_FILE}, or set {WEIGHTS_ENV} to its path")
        self.features = list(features)
        if not self.features:
            raise ValueError("InceptionFeatures: no features requested")
        unknown = [f for f in self.features if f not in FEATURE_NAMES]
        if unknown:
            raise ValueError(f"InceptionFeatures: unknown feature {unknown[0]!r}; choose from {', '.join(FEATURE_NAMES)}")
        # What the network itself returns; the spatial features are taken on the way, so the
        # network must run past Mixed_6d (it stops early when only '64' or '192' is asked for).
        self._net_features = [f for f in self.features if f != SPATIAL]
        if SPATIAL in self.features and all(f in ("64", "192") for f in self._net_features):
            self._net_features.append("768")
        state = load_inception_weights(path)  # before torch-fidelity is imported: a bad file fails fast
        try:
            cls = _network_class()
        except ImportError as e:
            raise EvalError(f"Inception features need torch-fidelity ({_first_line(e)}): "
                            "pip install 'soflow[fid]'") from None
        net = cls("inception-v3-compat", self._net_features, feature_extractor_weights_path=_empty_torch_file(),
                  feature_extractor_internal_dtype=dtype)
        _check_fit(net, state, path)
        torch.nn.Module.load_state_dict(net, state, strict=True)
        self._spatial: Tensor | None = None
        if SPATIAL in self.features:
            net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.net = net.to(self.device)
        self.batch_size = int(batch_size)
        self.weights_path = path

    def _keep_spatial(self, module, inputs, output: Tensor) -> None:
        # [N, 192, 17, 17] -> first 7 channels, NHWC order as ADM flattens them -> [N, 2023]
        x = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
        self._spatial = x.reshape(x.shape[0], -1)

    @torch.inference_mode()
    def extract(self, images) -> dict[str, Tensor]:
        """{feature name: float32 CPU tensor [N, ...]} for uint8 images [N, 1 or 3, H, W]."""
        x = _check_images(images)
        outs: dict[str, list[Tensor]] = {f: [] for f in self.features}
        for lo in range(0, x.shape[0], self.batch_size):
            batch = x[lo:lo + self.batch_size].to(self.device)
            if batch.shape[1] == 1:
                batch = batch.repeat(1, 3, 1, 1)
            self._spatial = None
            named = dict(zip(self._net_features, self.net(batch)))
            named[SPATIAL] = self._spatial
            for name in self.features:
                outs[name].append(named[name].float().cpu())
        self._spatial = None
        return {k: torch.cat(v) for k, v in outs.items()}

    def __call__(self, images) -> Tensor:
        """The first requested feature (pool features by default) as float32 [N, D]."""
        return self.extract(images)[self.features[0]]


def _check_images(images) -> Tensor:
    x = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
    if not torch.is_tensor(x) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[0] < 1:
        desc = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"expected uint8 images [N, 1 or 3, H, W], got {desc}")
    return x


# --------------------------------------------------------------------------------------------
# Reading samples


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


# --------------------------------------------------------------------------------------------
# FID


Extractor = Callable[[Tensor], Tensor]


def stats_from_images(images: ImagesLike, extractor: Extractor) -> Stats:
    """(mu, sigma) of ``extractor`` features of images (a uint8 tensor, a folder or an .npz)."""
    x = load_images(images) if isinstance(images, (str, Path)) else _check_images(images)
    return statistics(extractor(x))


def fid_from_images(images_a: ImagesLike, ref_stats_or_images_b, extractor: Extractor) -> float:
    """FID between images A and a reference.

    ``images_a``: uint8 [N, C, H, W] tensor/array, a folder of images, or a sample ``.npz``.
    ``ref_stats_or_images_b``: a (mu, sigma) pair, an ``.npz`` with ``mu``/``sigma`` (e.g. ADM's
    reference batch), or images in any of the forms of ``images_a``.
    ``extractor``: images -> features [N, D], e.g. :class:`InceptionFeatures`.
    """
    mu1, sigma1 = stats_from_images(images_a, extractor)
    ref = ref_stats_or_images_b
    if isinstance(ref, (tuple, list)) and len(ref) == 2:
        mu2, sigma2 = ref
    elif isinstance(ref, (str, Path)) and Path(ref).is_file() and _has_stats(Path(ref)):
        mu2, sigma2 = load_stats(ref)
    else:
        mu2, sigma2 = stats_from_images(ref, extractor)
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def _has_stats(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with _open_npz(path) as z:
        return "mu" in z.files and "sigma" in z.files
