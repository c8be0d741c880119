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

import zipfile
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from ..errors import EvalError
from .images import _check_images, _open_npz, _read_array, load_images

PRC_K = 3  # neighbours of precision and recall, as in ADM's evaluator

ImagesLike = Union[Tensor, np.ndarray, str, Path]
Stats = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------------------------
# Fréchet distance and statistics


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, eps: float = 1e-6) -> float:
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


def statistics(features: Tensor | np.ndarray) -> Stats:
    """Mean (D,) and unbiased covariance (D, D) of features [N, D], in float64."""
    f = features.detach().cpu().double().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"statistics: expected features [N >= 2, D], got shape {tuple(f.shape)}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def metric_name(nfe: int, guidance: float | None = None) -> str:
    """The metrics key of the FID at `nfe` and guidance scale `guidance`: fid_nfe1, fid_nfe2_w1.5, ..."""
    return f"fid_nfe{nfe}" if guidance is None else f"fid_nfe{nfe}_w{guidance:g}"


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, *, mu_s: np.ndarray | None = None,
               sigma_s: np.ndarray | None = None, features: Tensor | np.ndarray | None = None) -> Path:
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


# --------------------------------------------------------------------------------------------
# Inception Score


def inception_score(logits: Tensor | np.ndarray, splits: int = 10) -> tuple[float, float]:
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


def precision_recall(real: Tensor | np.ndarray, fake: Tensor | np.ndarray, k: int = PRC_K,
                     batch_size: int = 10000) -> tuple[float, float]:
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
# FID


Extractor = Callable[[Tensor], Tensor]


def stats_from_images(images: ImagesLike, extractor: Extractor) -> Stats:
    """(mu, sigma) of ``extractor`` features of images (a uint8 tensor, a folder or an .npz)."""
    x = load_images(images) if isinstance(images, (str, Path)) else _check_images(images)
    return statistics(extractor(x))


def fid_from_images(images_a: ImagesLike, ref_stats_or_images_b: Stats | ImagesLike, extractor: Extractor) -> float:
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
