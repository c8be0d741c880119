"""A residual MLP for vector data (2-D toys, point clouds): F(x, t, s, y) on [B, D]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dit import GuidanceEmbedder, add_guidance, timestep_embedding


class ResidualMLP(nn.Module):
    """`guidance_input=True` adds Emb_w(w) to the conditioning (GuidanceEmbedder, zero at the start)."""

    takes_guidance = True

    @staticmethod
    def data_args(sample_shape: tuple, num_classes: int, null_class: bool, augment_dim: int) -> dict:
        """Constructor arguments fixed by the data: [D] points, classes (+ null)."""
        return dict(dim=sample_shape[0], num_classes=num_classes, null_class=null_class)

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 4, time_dim: int = 64,
                 num_classes: int = 0, null_class: bool = True, time_scale: float = 1000.0,
                 guidance_input: bool = False):
        super().__init__()
        self.time_scale = time_scale  # spreads t in [0, 1] over the embedding's frequencies
        self.in_channels = self.dim = dim
        self.num_classes = num_classes
        self.time_dim = time_dim
        self.time = nn.Sequential(nn.Linear(2 * time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label = nn.Embedding(num_classes + int(null_class), hidden) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth))
        self.modulations = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.w_embedder = GuidanceEmbedder(hidden, time_dim) if guidance_input else None

    @property
    def sample_shape(self) -> tuple:
        return (self.dim,)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, x: Tensor, t: Tensor, s: Tensor, labels: Tensor | None = None,
                augment_labels: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x has shape {tuple(x.shape)}; this MLP expects [B, {self.dim}]")
        k = self.time_scale
        c = torch.cat([timestep_embedding(t * k, self.time_dim), timestep_embedding((t - s) * k, self.time_dim)], dim=1)
        c = self.time(c.to(x.dtype))
        if self.label is not None:
            if labels is None:
                labels = torch.full_like(t, self.null_label, dtype=torch.long)
            c = c + self.label(labels)
        c = add_guidance(self, c, guidance)
        h = self.inp(x)
        for block, mod in zip(self.blocks, self.modulations):
            h = h + block(h + mod(F.silu(c)))
        return self.out(h)
