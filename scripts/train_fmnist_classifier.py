"""Train the Fashion-MNIST evaluator shipped in src/soflow/eval/weights (target: >= 92 % test accuracy).

    python scripts/train_fmnist_classifier.py [--data /usr/share/datasets/fashion-mnist] [--epochs 6]
"""

import argparse
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from soflow.data.images import fashion_mnist, to_float
from soflow.eval.fmnist import WEIGHTS, FashionClassifier, features_and_predictions


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=None)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", default=str(WEIGHTS))
    args = ap.parse_args()
    torch.manual_seed(0)
    train, test = fashion_mnist(args.data, "train"), fashion_mnist(args.data, "test")
    x, y = to_float(train.images), train.labels
    net = FashionClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = args.epochs * (len(x) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    start = time.time()
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x))
        for i in range(len(x) // args.batch_size):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            xb = x[idx]
            flip = torch.rand(len(xb)) < 0.5  # horizontal flips keep every Fashion-MNIST class
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = F.cross_entropy(net(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        _, pred = features_and_predictions(net.eval(), to_float(test.images))
        acc = (pred == test.labels).float().mean().item()
        print(f"epoch {epoch + 1}: test accuracy {acc:.4f} ({time.time() - start:.0f} s)", flush=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
