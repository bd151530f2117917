"""The reconstruction decoder of EDC: from the encoder's deepest stage back up to each contrasted stage.

EDC (Guo et al., "Encoder-Decoder Contrast for Unsupervised Anomaly Detection in Medical Images",
IEEE TMI 2023, https://ieeexplore.ieee.org/document/10296925) pairs an ImageNet encoder with a decoder
that sees only the encoder's bottleneck and must rebuild the shallower stages. The original decoder
mirrors a ResNet-50; this one mirrors whatever timm backbone is fine-tuned: one level per contrasted
stage, each upsampling to that stage's size, a 3×3 convolution to its width, residual blocks, and a
linear 1×1 head (stage outputs of EfficientNets are not rectified, so the head has no activation).

Only the encoder is kept after fine-tuning; the decoder exists to give the encoder a training signal.

Example:
    >>> import torch
    >>> decoder = FeatureDecoder(in_channels=320, out_channels=[24, 40, 112])
    >>> maps = decoder(torch.zeros(2, 320, 2, 2), sizes=[(16, 16), (8, 8), (4, 4)])
    >>> [tuple(m.shape) for m in maps]
    [(2, 24, 16, 16), (2, 40, 8, 8), (2, 112, 4, 4)]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["FeatureDecoder", "ResidualBlock"]


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Two 3×3 convolutions with batch norm and an identity shortcut, at constant width.

    Args:
        channels: Input and output channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(x + body(x))``."""
        return F.relu(x + self.body(x))


class FeatureDecoder(nn.Module):
    """Rebuilds the encoder's stage maps from its bottleneck map.

    Args:
        in_channels: Channels of the bottleneck (the encoder's deepest stage used).
        out_channels: Channels of the stages to rebuild, shallowest first (the encoder's order).
        blocks_per_stage: Residual blocks per level.

    Raises:
        ValueError: If no stage is given or a channel count is not positive.
    """

    def __init__(self, in_channels: int, out_channels: Sequence[int], blocks_per_stage: int = 2) -> None:
        super().__init__()
        out_channels = [int(c) for c in out_channels]
        if not out_channels or min(out_channels) < 1 or in_channels < 1:
            msg = f"FeatureDecoder needs positive channel counts, got in={in_channels}, out={out_channels}"
            raise ValueError(msg)
        self.out_channels = tuple(out_channels)
        bodies, heads = [], []
        width = int(in_channels)
        # Built deepest level first: the order in which the bottleneck is decoded.
        for channels in reversed(out_channels):
            blocks = [ResidualBlock(channels) for _ in range(int(blocks_per_stage))]
            bodies.append(nn.Sequential(_conv_bn_relu(width, channels), *blocks))
            heads.append(nn.Conv2d(channels, channels, kernel_size=1))
            width = channels
        self.bodies = nn.ModuleList(bodies)
        self.heads = nn.ModuleList(heads)

    def forward(self, bottleneck: torch.Tensor, sizes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Decode ``bottleneck`` into one map per stage.

        Args:
            bottleneck: ``[N, in_channels, h, w]``.
            sizes: ``(H, W)`` of each stage to rebuild, shallowest first; the sizes come from the
                encoder's own maps, so odd image sizes (stride rounding) need no special case.

        Returns:
            Maps ``[N, out_channels[i], *sizes[i]]``, shallowest first.

        Raises:
            ValueError: If the number of sizes differs from the number of stages.
        """
        if len(sizes) != len(self.out_channels):
            msg = f"FeatureDecoder rebuilds {len(self.out_channels)} stages, got {len(sizes)} sizes"
            raise ValueError(msg)
        hidden = bottleneck
        maps = []
        for body, head, size in zip(self.bodies, self.heads, reversed(list(sizes)), strict=True):
            hidden = F.interpolate(hidden, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
            hidden = body(hidden)
            maps.append(head(hidden))
        return maps[::-1]
