"""A small Fashion-MNIST classifier as a domain-specific evaluator: the Frechet distance between
its penultimate features of generated and real test images, and its accuracy on class-conditional
samples.  Trained by scripts/train_fmnist_classifier.py; the weights ship with the package."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

WEIGHTS = Path(__file__).parent / "weights" / "fmnist_classifier.safetensors"


class FashionClassifier(nn.Module):
    """Two conv blocks (32 and 64 channels) and a 256-d penultimate layer, for [-1, 1] 28x28 images."""

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.body = nn.Sequential(block(1, 32), block(32, 64), nn.Flatten(), nn.Dropout(0.3),
                                  nn.Linear(64 * 7 * 7, 256), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(256, 10))

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def load_classifier(path: str | Path = WEIGHTS, device: str | torch.device = "cpu") -> FashionClassifier:
    """The shipped Fashion-MNIST classifier, in eval mode on `device`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing classifier weights; run scripts/train_fmnist_classifier.py")
    net = FashionClassifier()
    net.load_state_dict(load_file(str(path)))
    return net.to(device).eval()


@torch.no_grad()
def features_and_predictions(net: FashionClassifier, images: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Penultimate features (float64) and predicted classes of images in [-1, 1], [N, 1, 28, 28]."""
    feats, preds = [], []
    device = next(net.parameters()).device
    for chunk in images.split(batch_size):
        f = net.features(chunk.to(device, torch.float32).clamp(-1, 1))
        feats.append(f.double().cpu())
        preds.append(net.head(f).argmax(1).cpu())
    return torch.cat(feats), torch.cat(preds)
