"""Evaluating trained runs: point-cloud distances for vector data, the Fashion-MNIST evaluator,
and FID statistics of image sources."""

from __future__ import annotations

import functools

import torch

from ..data import make_dataset
from ..sampling import generate
from ..train.load import load_run
from .fid import EvalError, InceptionFeatures, frechet_distance, inception_score, load_images, statistics
from .points import energy_distance, sliced_wasserstein2


def eval_points(checkpoint, nfe: int, num: int = 2000, seed: int = 0, warn=print) -> dict:
    """Energy distance and sliced W2 between `num` generated points and `num` data points."""
    cfg, flow, step = load_run(checkpoint, warn=warn)
    data = make_dataset(cfg.data)
    if len(data.sample_shape) != 1:
        raise EvalError(f"{checkpoint}: `eval points` is for vector data; this run trains on {cfg.data.name}")
    x = generate(cfg.method, flow, num, nfe, seed=seed)
    ref = data.reference(num)
    return {"method": cfg.method, "nfe": nfe, "step": step, "num": num, "energy_distance": energy_distance(x, ref),
            "sliced_w2": sliced_wasserstein2(x, ref)}


def eval_fmnist(checkpoint, nfe: int, per_class: int = 100, seed: int = 0, data_path=None, warn=print,
                guidance: float = 1.0) -> dict:
    """`fmnist_scores` of per_class samples of each class.  guidance != 1 samples with
    classifier-free guidance (two network forwards per evaluation)."""
    cfg, flow, step = load_run(checkpoint, warn=warn)
    if cfg.data.name != "fmnist" or not flow.num_classes:
        raise EvalError(f"{checkpoint}: `eval fmnist` needs a class-conditional Fashion-MNIST run")
    labels = torch.arange(10).repeat_interleave(per_class)
    x = generate(cfg.method, flow, len(labels), nfe, seed=seed, labels=labels, guidance=guidance)
    return {"method": cfg.method, "nfe": nfe, "guidance": guidance, "step": step,
            **fmnist_scores(x, labels, data_path or cfg.data.path)}


def fmnist_scores(images: torch.Tensor, labels: torch.Tensor, data_path=None) -> dict:
    """Frechet distance in the shipped classifier's penultimate features between images in [-1, 1]
    [N, 1, 28, 28] and the real test split, and the classifier's accuracy on their labels."""
    from .fmnist import features_and_predictions, load_classifier

    feats, preds = features_and_predictions(load_classifier(), images)
    return {"num": len(labels), "classifier_fd": frechet_distance(*statistics(feats), *_fmnist_test_statistics(data_path)),
            "class_accuracy": (preds == labels).float().mean().item()}


@functools.lru_cache(maxsize=2)
def _fmnist_test_statistics(data_path=None):
    """Classifier-feature statistics of the real test split, computed once per folder and process."""
    from ..data.images import fashion_mnist, to_float
    from .fmnist import features_and_predictions, load_classifier

    ref_feats, _ = features_and_predictions(load_classifier(), to_float(fashion_mnist(data_path, "test").images))
    return statistics(ref_feats)


def source_images(src: str, data_path: str | None = None) -> torch.Tensor:
    """uint8 NCHW images from a folder, an ADM-style .npz, or a dataset name (fmnist, cifar10)."""
    if src in ("fmnist", "cifar10"):
        from ..train.config import DataConfig

        return make_dataset(DataConfig(name=src, path=data_path)).images
    return load_images(src)


def image_stats(src: str, weights=None, device=None, batch_size: int = 64, data_path=None, with_is: bool = False,
                dims: str = "2048"):
    """(mu, sigma, inception score or None, number of images) of an image source; `dims` picks the
    Inception layer (2048: the pool features of FID; 64, 192, 768: earlier layers)."""
    features = (dims, "logits_unbiased") if with_is else (dims,)
    extractor = InceptionFeatures(weights, device=device, batch_size=batch_size, features=features)
    images = source_images(src, data_path)
    out = extractor.extract(images)
    mu, sigma = statistics(out[dims])
    score = inception_score(out["logits_unbiased"]) if with_is else None
    return mu, sigma, score, len(images)
