import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    """Golden values from the reference implementation: $SOFLOW_REFERENCE_FIXTURES, or
    ../shared/fixtures/reference beside the repository."""
    env = os.environ.get("SOFLOW_REFERENCE_FIXTURES")
    return Path(env) if env else (REPO.parent / "shared" / "fixtures" / "reference")


def reference_cases() -> dict:
    path = reference_dir() / "cases.json"
    if not path.is_file():
        return {"cases": [], "missing": str(path)}
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
