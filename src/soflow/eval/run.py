"""Evaluating trained runs: point-cloud distances for vector data, the Fashion-MNIST evaluator,
and FID statistics of image sources."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import torch

from ..data import make_dataset
from ..errors import EvalError
from ..pipeline import Pipeline
from ..run.config import DataConfig
from .fid import PRC_K, frechet_distance, inception_score, load_features, load_stats, precision_recall, save_stats, statistics
from .fmnist import features_and_predictions, load_classifier
from .images import load_images, npz_keys
from .inception import LAYER_DIMS, SPATIAL, InceptionFeatures
from .points import energy_distance, sliced_wasserstein2


def eval_points(checkpoint: str | Path, nfe: int, num: int = 2000, seed: int = 0,
                warn: Callable[[str], None] = print) -> dict:
    """Energy distance and sliced W2 between `num` generated points and `num` data points."""
    pipe = Pipeline.from_pretrained(checkpoint, warn=warn)
    cfg = pipe.config
    data = make_dataset(cfg.data)
    if len(data.sample_shape) != 1:
        raise EvalError(f"{checkpoint}: `eval points` is for vector data; this run trains on {cfg.data.name}")
    x = pipe.sample(num, nfe, seed=seed)
    ref = data.reference(num)
    return {"method": cfg.method, "nfe": nfe, "step": pipe.step, "num": num, "energy_distance": energy_distance(x, ref),
            "sliced_w2": sliced_wasserstein2(x, ref)}


def eval_fmnist(checkpoint: str | Path, nfe: int, per_class: int = 100, seed: int = 0, data_path: str | None = None,
                warn: Callable[[str], None] = print, guidance: float | None = None) -> dict:
    """`fmnist_scores` of per_class samples of each class at classifier-free guidance scale
    `guidance` (None: the model's own; its meaning per kind of model: soflow.guidance)."""
    pipe = Pipeline.from_pretrained(checkpoint, warn=warn)
    cfg = pipe.config
    if cfg.data.name != "fmnist" or not pipe.flow.num_classes:
        raise EvalError(f"{checkpoint}: `eval fmnist` needs a class-conditional Fashion-MNIST run")
    labels = torch.arange(10).repeat_interleave(per_class)
    x = pipe.sample(len(labels), nfe, seed=seed, labels=labels, guidance=guidance)
    return {"method": cfg.method, "nfe": nfe, "guidance": pipe.guidance_scales.resolve(guidance), "step": pipe.step,
            **fmnist_scores(x, labels, data_path or cfg.data.path)}


def fmnist_scores(images: torch.Tensor, labels: torch.Tensor, data_path: str | None = None) -> dict:
    """Frechet distance in the shipped classifier's penultimate features between images in [-1, 1]
    [N, 1, 28, 28] and the real test split, and the classifier's accuracy on their labels."""
    feats, preds = features_and_predictions(load_classifier(), images)
    return {"num": len(labels), "classifier_fd": frechet_distance(*statistics(feats), *_fmnist_test_statistics(data_path)),
            "class_accuracy": (preds == labels).float().mean().item()}


@functools.lru_cache(maxsize=2)
def _fmnist_test_statistics(data_path=None):
    """Classifier-feature statistics of the real test split, computed once per folder and process."""
    from ..data.images import fashion_mnist, to_float  # reads PIL, which nothing else here needs

    ref_feats, _ = features_and_predictions(load_classifier(), to_float(fashion_mnist(data_path, "test").images))
    return statistics(ref_feats)


def source_images(src: str, data_path: str | None = None) -> torch.Tensor:
    """uint8 NCHW images from a folder, an ADM-style .npz, or a dataset name (fmnist, cifar10)."""
    if src in ("fmnist", "cifar10"):
        return make_dataset(DataConfig(name=src, path=data_path)).images
    return load_images(src)


def fid_reference(src: str, out: str | Path, weights: str | Path | None = None,
                  device: str | torch.device | None = None, batch_size: int = 64, data_path: str | None = None,
                  dims: str = "2048", prc: bool = False, sfid: bool = False) -> tuple[Path, int]:
    """Write the reference statistics of an image source to `out` (`soflow fid ref`): mu and sigma
    of the `dims` layer, plus the features themselves with `prc` (for precision and recall) and
    ADM's spatial statistics mu_s, sigma_s with `sfid`.  Returns (path written, number of images)."""
    extractor = _extractor(weights, device, batch_size, dims, sfid=sfid)
    out_feats = _features(extractor, src, data_path, dims)
    if prc and len(out_feats[dims]) <= PRC_K:
        raise EvalError(f"--images {src}: precision and recall use the {PRC_K} nearest neighbours of each image, so "
                        f"a reference for --prc needs at least {PRC_K + 1} images, not {len(out_feats[dims])}; "
                        f"nothing was written to {out}")
    extra = {}
    if sfid:
        extra["mu_s"], extra["sigma_s"] = statistics(out_feats[SPATIAL])
    path = save_stats(out, *statistics(out_feats[dims]), features=out_feats[dims] if prc else None, **extra)
    return path, len(out_feats[dims])


def fid_against_reference(src: str, ref: str | Path, weights: str | Path | None = None,
                          device: str | torch.device | None = None, batch_size: int = 64, data_path: str | None = None,
                          dims: str = "2048", with_is: bool = False, prc: bool = False, sfid: bool = False,
                          k: int = PRC_K) -> dict:
    """`soflow fid calc`: FID of an image source against the reference file `ref`, and with the
    flags the Inception Score, sFID (against the reference's mu_s, sigma_s) and precision / recall
    (k nearest neighbours, against the reference's `features`, or the features of the images in
    its arr_0, which is where ADM's reference batches keep them).  The reference file is checked
    before any image is read."""
    mu_r, sigma_r = load_stats(ref)
    _check_dims(ref, mu_r.shape[0], dims, "mu")
    spatial_ref = load_stats(ref, ("mu_s", "sigma_s")) if sfid else None
    if sfid:
        _check_dims(ref, spatial_ref[0].shape[0], SPATIAL, "mu_s")
    ref_features = _reference_features(ref, dims) if prc else None
    extractor = _extractor(weights, device, batch_size, dims, with_is=with_is, sfid=sfid)
    out = _features(extractor, src, data_path, dims)
    result = {"fid": frechet_distance(*statistics(out[dims]), mu_r, sigma_r), "num_images": len(out[dims])}
    if sfid:
        result["sfid"] = frechet_distance(*statistics(out[SPATIAL]), *spatial_ref)
    if prc:
        if isinstance(ref_features, str):  # ADM's reference images: their features, as the samples'
            ref_features = _features(extractor, ref_features, None, dims)[dims]
        result["precision"], result["recall"] = _precision_recall(ref, ref_features, out[dims], k, extractor.device)
    if with_is:
        result["inception_score"], result["inception_score_std"] = inception_score(out["logits_unbiased"])
    return result


def _extractor(weights, device, batch_size, dims, with_is=False, sfid=False) -> InceptionFeatures:
    """The `dims` layer, and the logits / spatial features when asked for, in one pass."""
    features = (dims,) + (("logits_unbiased",) if with_is else ()) + ((SPATIAL,) if sfid else ())
    return InceptionFeatures(weights, device=device, batch_size=batch_size, features=features)


def _features(extractor: InceptionFeatures, src, data_path, dims: str) -> dict:
    out = extractor.extract(source_images(src, data_path))
    if len(out[dims]) < 2:
        raise EvalError(f"{src}: {len(out[dims])} image; statistics need at least 2")
    return out


def _check_dims(ref, found: int, layer: str, key: str) -> None:
    if layer in LAYER_DIMS and found != LAYER_DIMS[layer]:
        hint = ("; pass the --dims the reference was written with" if layer != SPATIAL else
                f"; expected ADM's {LAYER_DIMS[SPATIAL]} spatial features")
        raise EvalError(f"{ref}: {key} has {found} dimensions, but the {layer!r} features have "
                        f"{LAYER_DIMS[layer]}{hint}")


def _reference_features(ref, dims: str):
    """The reference's feature array, or its path when only its arr_0 images are there."""
    keys = npz_keys(ref)
    if "features" not in keys and "arr_0" in keys:
        return str(ref)
    feats = load_features(ref)  # a one-line error when there are neither features nor images
    _check_dims(ref, feats.shape[1], dims, "features")
    return feats


def _precision_recall(ref, real, fake, k: int, device) -> tuple[float, float]:
    """In float32 on the Inception network's device (ADM's evaluator takes float16 distances)."""
    if min(len(real), len(fake)) <= k:
        raise EvalError(f"{ref}: precision/recall with k = {k} needs more than {k} images on each side "
                        f"(reference {len(real)}, samples {len(fake)})")
    real = torch.as_tensor(real, dtype=torch.float32).to(device)
    return precision_recall(real, fake.to(device, torch.float32), k=k)
