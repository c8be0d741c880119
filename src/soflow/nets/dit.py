"""Diffusion Transformer (DiT) for solution functions F(x_t, t, s).

The DiT of Peebles & Xie with one addition: the conditioning vector is

    c = Emb_t(t) + Emb_gap(t - s) + Emb_y(y)   [+ Emb_w(w) with guidance_input],

two separate timestep embedders, times fed raw in [0, 1]; the guidance scale w, also raw, only in
networks trained with guidance as an input (GuidanceEmbedder, zero output at the start).  Module names match the reference
checkpoints (`t_embedder`, `s_embedder` for the gap, `y_embedder`, `blocks.i.attn.qkv`, ...), so
their state dicts load without renaming.  Attention uses `scaled_dot_product_attention`, which
dispatches to fused kernels where the device has them.  Fused kernels have no forward-mode AD:
run forward-mode differentiation (`torch.func.jvp`, MeanFlow) inside `math_attention()`.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features [cos(t w_i), sin(t w_i)] with w_i = max_period^(-i / (dim / 2))."""
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32  # float32 unless checking in float64
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t[:, None].to(dtype) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [grid * grid, dim]; half the channels per axis."""

    def axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([axis(dim // 2, w), axis(dim // 2, h)], axis=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation x (1 + scale) + shift, one shift and scale per sample."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Emb_t(t): sinusoidal features of a time through a two-layer MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


GUIDANCE_EMBEDDER = "w_embedder"  # module name of Emb_w in the networks that take the guidance scale


class GuidanceEmbedder(TimestepEmbedder):
    """Emb_w(w): sinusoidal features of the guidance scale w through a two-layer MLP whose last layer
    starts at zero, so its output is exactly 0 until training moves it: the network first computes
    what the same network without it does (a fixed-scale or flow-matching model loads unchanged),
    and the first layer, random, gets gradient as soon as the last one moves."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__(hidden, freq_dim)
        self.zero_output()

    def zero_output(self) -> None:
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)


def add_guidance(net: nn.Module, c: Tensor, guidance: Tensor | None) -> Tensor:
    """c + Emb_w(w) for a network with a guidance embedder; one line if w is missing or unwanted."""
    embedder = getattr(net, GUIDANCE_EMBEDDER, None)
    if embedder is None:
        if guidance is not None:
            raise ValueError("this network does not take a guidance scale as input (it was built without "
                             "guidance_input); guide it at sampling time instead")
        return c
    if guidance is None:
        raise ValueError("this network takes the guidance scale w as an input; pass guidance=w (one per row)")
    return c + embedder(guidance).to(c.dtype)


class LabelEmbedder(nn.Module):
    """Class table with one extra row, the null class (id = num_classes), when guidance is trained."""

    def __init__(self, num_classes: int, hidden: int, null_class: bool):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(null_class), hidden)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """Image [B, C, H, W] to a token sequence [B, (H/p)(W/p), hidden] by a p x p strided convolution."""

    def __init__(self, patch: int, in_channels: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def math_attention() -> AbstractContextManager[None]:
    """Context manager restricting `scaled_dot_product_attention` to its math backend.

    The math path is composed of ordinary ops and so supports forward-mode AD (`torch.func.jvp`),
    which the fused kernels (flash / memory-efficient / CPU flash) do not.  It is a dispatcher
    setting, so it covers every SDPA call inside it (DiT and U-Net attention alike); outside it the
    fused kernels are used as before.  It is slower and uses O(N^2) memory per head.
    """
    return sdpa_kernel([SDPBackend.MATH])


class Attention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention`."""

    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """The transformer block's two-layer MLP with tanh-approximated GELU."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation by c."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from each token to its patch of the output."""

    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """F(x, t, s, y[, w]) on [B, C, H, W] latents; `num_classes=0` makes it unconditional,
    `guidance_input=True` adds Emb_w(w) to the conditioning vector c (GuidanceEmbedder)."""

    takes_guidance = True

    @staticmethod
    def data_args(sample_shape: tuple, num_classes: int, null_class: bool, augment_dim: int) -> dict:
        """Constructor arguments fixed by the data: [C, H, W] latents or images, classes (+ null)."""
        return dict(in_channels=sample_shape[0], input_size=sample_shape[-1], num_classes=num_classes,
                    null_class=null_class)

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 num_classes: int = 1000, null_class: bool = True, guidance_input: bool = False):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels = self.out_channels = in_channels
        self.num_classes = num_classes
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.s_embedder = TimestepEmbedder(hidden_size)  # embeds the gap t - s
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, null_class) if num_classes else None
        grid = input_size // patch_size
        self.pos_embed = nn.Parameter(torch.empty(1, grid * grid, hidden_size), requires_grad=False)
        if not self.pos_embed.is_meta:  # a network built on the meta device (for its shapes) allocates nothing
            self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(hidden_size, grid)).unsqueeze(0))
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.w_embedder = GuidanceEmbedder(hidden_size) if guidance_input else None
        self.initialize_weights()

    @property
    def sample_shape(self) -> tuple:
        return (self.in_channels, self.input_size, self.input_size)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def initialize_weights(self) -> None:
        """DiT initialization: xavier linears, zeroed adaLN and output, so F = 0 at the start.

        The gap embedder keeps its xavier init, as in the reference recipe.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.w_embedder is not None:  # as the timestep embedder, but with a zero output layer
            nn.init.normal_(self.w_embedder.mlp[0].weight, std=0.02)
            self.w_embedder.zero_output()

    def unpatchify(self, x: Tensor) -> Tensor:
        p, c = self.patch_size, self.out_channels
        h = w = self.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: Tensor, t: Tensor, s: Tensor, labels: Tensor | None = None,
                augment_labels: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x has shape {tuple(x.shape)}; this DiT expects [B, {', '.join(map(str, expected))}]")
        c = self.t_embedder(t) + self.s_embedder(t - s)
        if self.y_embedder is not None:
            if labels is None:
                labels = torch.full_like(t, self.null_label, dtype=torch.long)
            c = c + self.y_embedder(labels)
        c = add_guidance(self, c, guidance)
        h = self.x_embedder(x) + self.pos_embed
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))
