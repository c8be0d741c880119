import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    """Golden values from the reference implementation: $SOFLOW_REFERENCE_FIXTURES, or the copy
    vendored in tests/fixtures/reference (see its README)."""
    env = os.environ.get("SOFLOW_REFERENCE_FIXTURES")
    return Path(env) if env else (REPO / "tests" / "fixtures" / "reference")


def reference_cases() -> dict:
    """The fixture set's cases.json.  A missing set fails at collection: the reference tests are
    the proof of fidelity and must never be skipped."""
    path = reference_dir() / "cases.json"
    if not path.is_file():
        raise FileNotFoundError(f"no reference fixtures at {path}; restore tests/fixtures/reference "
                                "or set SOFLOW_REFERENCE_FIXTURES")
    return json.loads(path.read_text())


def randomize(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Replace all weights by noise so that zero-initialized outputs do not hide errors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """A weights file for torch-fidelity's InceptionV3 with random values: He-normal convolutions,
    identity batch norms, small random classifier, so that features differ between images."""
    inc = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")

    class Skeleton(inc.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the default init
            return None

    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pth")  # a path given, so the constructor does not download
    state = Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(folder / "empty.pth")).state_dict()
    g = torch.Generator().manual_seed(0)
    weights = {}
    for name, t in state.items():
        if name.endswith("conv.weight"):
            fan_in = t[0].numel()
            value = torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif name.endswith("bn.weight") or name.endswith("running_var"):
            value = torch.ones_like(t)
        elif name.endswith("bn.bias") or name.endswith("running_mean"):
            value = torch.zeros_like(t)
        elif name == "fc.weight":
            value = torch.randn(t.shape, generator=g) / t.shape[1] ** 0.5
        elif name == "fc.bias":
            value = torch.randn(t.shape, generator=g) * 0.1
        else:  # num_batches_tracked
            value = t.clone()
        weights[name] = value
    path = folder / "random-inception.pth"
    torch.save(weights, path)
    return path
