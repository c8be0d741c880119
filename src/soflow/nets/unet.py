"""EDM's SongUNet (DDPM++ / NCSN++ backbone) for solution functions F(x_t, t, s).

The two times enter as concatenated sinusoidal embeddings of t and of the gap t - s (each with
EDM's sin/cos swap), plus a linear map of the augmentation labels, before the mapping MLP; so
`map_layer0` is twice EDM's width.  Module names and the channel layout of the attention
projections match the reference checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _init_weight(shape, mode: str, fan_in: int, fan_out: int) -> Tensor:
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}")


class Linear(nn.Module):
    """Linear layer with EDM's weight initialisation, computed in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.in_features = in_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(_init_weight([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(_init_weight([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """Convolution with optional 2x FIR up/down-sampling (filter applied before the kernel)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[float] = (1, 1),
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down = up, down
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = nn.Parameter(_init_weight([out_channels, in_channels, kernel, kernel], **fans) * init_weight) if kernel else None
        self.bias = nn.Parameter(_init_weight([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.resample_filter is not None:
            f = self.resample_filter.to(x.dtype)
            pad = (f.shape[-1] - 1) // 2
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2, padding=pad)
            else:
                x = F.conv2d(x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2, padding=pad)
        if self.weight is not None:
            w = self.weight.to(x.dtype)
            x = F.conv2d(x, w, None if self.bias is None else self.bias.to(x.dtype), padding=w.shape[-1] // 2)
        return x


class GroupNorm(nn.Module):
    """Group norm with at least `min_channels_per_group` channels per group (EDM), in the input's dtype."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        # contiguous(): forward-mode AD of group_norm (MeanFlow's JVP) rejects strided inputs
        return F.group_norm(x.contiguous(), self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """Residual block with additive embedding, dropout and optional single-head self-attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, dropout: float = 0.0,
                 resample_filter: Sequence[float] = (1, 1), eps: float = 1e-6):
        super().__init__()
        xavier = dict(init_mode="xavier_uniform")
        zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dropout = dropout
        self.skip_scale = math.sqrt(0.5)
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **xavier)
        self.affine = Linear(emb_channels, out_channels, **xavier)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, 1, up=up, down=down, resample_filter=resample_filter, **xavier)
        self.attention = attention
        if attention:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
            self.proj = Conv2d(out_channels, out_channels, 1, **zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        x = F.silu(self.norm1(x + self.affine(emb)[:, :, None, None].to(x.dtype)))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (orig if self.skip is None else self.skip(orig))) * self.skip_scale
        if self.attention:
            b, c, h, w = x.shape
            # The reference layout interleaves q, k, v per channel: channel index = 3 * i + {0, 1, 2}.
            q, k, v = self.qkv(self.norm2(x)).reshape(b, 1, c, 3, h * w).transpose(-2, -3).unbind(2)
            a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
            x = (self.proj(a.transpose(-1, -2).reshape(b, c, h, w)) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """EDM's sinusoidal embedding with endpoint frequencies, in the U-Net's [sin, cos] order."""

    def __init__(self, num_channels: int, max_positions: int = 10000):
        super().__init__()
        self.num_channels, self.max_positions = num_channels, max_positions

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - 1)
        args = torch.outer(x, ((1 / self.max_positions) ** freqs).to(x.dtype))
        return torch.cat([args.sin(), args.cos()], dim=1)


class SongUNet(nn.Module):
    """F(x, t, s, augment_labels) on [B, C, H, W] images; `label_dim` > 0 adds one-hot class input."""

    @staticmethod
    def data_args(sample_shape: tuple, num_classes: int, null_class: bool, augment_dim: int) -> dict:
        """Constructor arguments fixed by the data: [C, H, W] images, classes, EDM augment labels.
        The U-Net takes a one-hot class vector, so dropped labels need no extra null row."""
        return dict(in_channels=sample_shape[0], out_channels=sample_shape[0], img_resolution=sample_shape[-1],
                    label_dim=num_classes, augment_dim=augment_dim)

    def __init__(self, img_resolution: int = 32, in_channels: int = 3, out_channels: int = 3,
                 label_dim: int = 0, augment_dim: int = 6, model_channels: int = 128,
                 channel_mult: Sequence[int] = (2, 2, 2), channel_mult_emb: int = 4, num_blocks: int = 4,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.30, channel_mult_noise: int = 2,
                 resample_filter: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.num_classes = label_dim
        self.augment_dim = augment_dim
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        xavier = dict(init_mode="xavier_uniform")
        block = dict(emb_channels=emb_channels, dropout=dropout, resample_filter=resample_filter)

        self.map_noise = PositionalEmbedding(noise_channels)
        self.map_label = Linear(label_dim, 2 * noise_channels, **xavier) if label_dim else None
        self.map_augment = Linear(augment_dim, 2 * noise_channels, bias=False, **xavier) if augment_dim else None
        self.map_layer0 = Linear(2 * noise_channels, emb_channels, **xavier)
        self.map_layer1 = Linear(emb_channels, emb_channels, **xavier)

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, 3, **xavier)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
        self.dec[f"{img_resolution}x{img_resolution}_aux_norm"] = GroupNorm(cout, eps=1e-6)
        self.dec[f"{img_resolution}x{img_resolution}_aux_conv"] = Conv2d(
            cout, out_channels, 3, init_mode="xavier_uniform", init_weight=1e-5)

    @property
    def sample_shape(self) -> tuple:
        return (self.in_channels, self.img_resolution, self.img_resolution)

    def embed(self, t: Tensor, s: Tensor) -> Tensor:
        """[Emb(t), Emb(t - s)] -> 2 * noise_channels features."""
        return torch.cat([self.map_noise(t), self.map_noise(t - s)], dim=1)

    def forward(self, x: Tensor, t: Tensor, s: Tensor, labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        expected = (self.in_channels, self.img_resolution, self.img_resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x has shape {tuple(x.shape)}; this U-Net expects [B, {', '.join(map(str, expected))}]")
        emb = self.embed(t.to(x.dtype), s.to(x.dtype))
        if self.map_label is not None:  # the null class (or no label) is the all-zero class vector
            if labels is None:
                labels = torch.full_like(t, self.num_classes, dtype=torch.long)
            onehot = F.one_hot(labels, self.num_classes + 1)[:, : self.num_classes].to(emb.dtype)
            emb = emb + self.map_label(onehot * math.sqrt(self.num_classes))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips = []
        for name, block in self.enc.items():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        out = None
        for name, block in self.dec.items():
            if name.endswith("aux_norm"):
                out = block(x)
            elif name.endswith("aux_conv"):
                out = block(F.silu(out))
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out
