"""The MoV-Adapter's downsampler: bottleneck stage, average pool, bottleneck stage.

Each stage is a RegNet-style bottleneck (1x1 conv, depthwise 3x3, squeeze-excite, 1x1 conv) with
LayerNorm2d, an identity shortcut and no activation after the sum. Its last norm weight starts
at zero, so at initialisation the downsampler is exactly an average pool.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map, at each position."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    """Channel gating: global mean, 1x1 conv to ``hidden``, SiLU, 1x1 conv back, sigmoid."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, kernel_size=1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.expand(self.act(self.reduce(x.mean(dim=(2, 3), keepdim=True))))
        return x * scale.sigmoid()


class BottleneckStage(nn.Module):
    """``x + LN(conv1x1(SE(LN-SiLU(dwconv3x3(LN-SiLU(conv1x1(x)))))))``; identity at init."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        if channels < 4:
            raise ValueError(f"channels must be >= 4 for squeeze-excite to C/4, got {channels}")
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.norm1 = LayerNorm2d(channels, eps=eps)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels,
                               bias=False)
        self.norm2 = LayerNorm2d(channels, eps=eps)
        self.act = nn.SiLU()
        self.se = SqueezeExcite(channels, channels // 4)
        self.conv3 = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.norm3 = LayerNorm2d(channels, eps=eps)
        nn.init.zeros_(self.norm3.weight)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.norm1(self.conv1(x)))
        h = self.act(self.norm2(self.conv2(h)))
        h = self.norm3(self.conv3(self.se(h)))
        return x + h


class Downsampler(nn.Module):
    """``(B, C, G, G) -> (B, C, G/factor, G/factor)``: stage, ``factor``x average pool, stage."""

    def __init__(self, channels: int, factor: int = 2, eps: float = 1e-5) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor = factor
        self.stage1 = BottleneckStage(channels, eps)
        self.pool = nn.AvgPool2d(factor)
        self.stage2 = BottleneckStage(channels, eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(
                f"downsampler input must be (B, C, H, W) with H and W divisible by "
                f"{self.factor}, got {tuple(x.shape)}"
            )
        return self.stage2(self.pool(self.stage1(x)))
