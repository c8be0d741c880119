"""torch-fidelity's InceptionV3 on local weights that soflow reads itself (tensors only).

torch-fidelity's own loader unpickles the weights file with ``weights_only=False``, which would run
any code the file names; soflow builds the network without loading and copies in the tensors that
:func:`load_inception_weights` read safely.
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import EvalError, UnreadableFile
from ..safeload import load_safetensors, load_torch
from .images import _check_images, _first_line

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "SOFLOW_INCEPTION_WEIGHTS"
# torch-fidelity's release of the converted TensorFlow weights (same tensors as WEIGHTS_FILE).
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
# Feature sizes of the Inception layers (torch-fidelity's names) and of ADM's spatial features.
SPATIAL = "spatial"
SPATIAL_CHANNELS, SPATIAL_SIZE = 7, 17
LAYER_DIMS = {"64": 64, "192": 192, "768": 768, "2048": 2048, SPATIAL: SPATIAL_CHANNELS * SPATIAL_SIZE ** 2}
# torch-fidelity's feature names for its InceptionV3, and soflow's spatial features.
FEATURE_NAMES = ("64", "192", "768", "2048", "logits_unbiased", "logits", SPATIAL)


def default_weights_path() -> Path:
    """$SOFLOW_INCEPTION_WEIGHTS, or ~/.cache/soflow/pt_inception-2015-12-05-6726825d.pth."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "soflow" / WEIGHTS_FILE


def load_inception_weights(path: str | Path) -> dict[str, Tensor]:
    """The named tensors of an InceptionV3 weights file: a torch file (read with
    ``weights_only=True``: tensors and plain values only, no code runs) or a ``.safetensors`` file.
    Anything else is a one-line :class:`EvalError` naming the file."""
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
    def extract(self, images: Tensor | np.ndarray) -> dict[str, Tensor]:
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

    def __call__(self, images: Tensor | np.ndarray) -> Tensor:
        """The first requested feature (pool features by default) as float32 [N, D]."""
        return self.extract(images)[self.features[0]]
