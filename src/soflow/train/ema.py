"""Exponential moving average of network weights (used for sampling and evaluation only)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema <- d ema + (1 - d) theta.

    every = 1: an update after every optimizer step (ImageNet recipe).
    every = K, float64 = True: the CIFAR-10 recipe; an update when the number of finished steps is
    a multiple of K (after steps 1, K + 1, 2K + 1, ...) with decay d^K, computed in float64 and
    stored back in the weights' dtype.  Buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, every: int = 1, float64: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        if every < 1:
            raise ValueError(f"EMA interval must be >= 1, got {every}")
        self.decay, self.every, self.float64 = decay, every, float64
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, finished_steps: int) -> None:
        """Call after each optimizer step with the count of steps finished before it."""
        if finished_steps % self.every:
            return
        d = self.decay ** self.every
        ema = [p for p in self.model.parameters()]
        new = [p.detach() for p in model.parameters()]
        if self.float64:
            for e, p in zip(ema, new):
                e.copy_(e.double().mul_(d).add_(p.double(), alpha=1 - d))
        else:
            torch._foreach_mul_(ema, d)
            torch._foreach_add_(ema, new, alpha=1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
