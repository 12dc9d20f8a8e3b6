"""Segmentation heads and the ViT feature pyramid.

- :class:`UPerHead`: UperNet as mmsegmentation's ``UPerHead`` builds it (the head of the papers'
  LoveDA runs): a pyramid-pooling module (scales 1, 2, 3, 6) on the coarsest level, 1x1 lateral
  convs and 3x3 FPN convs top-down, the levels upsampled to the finest and fused by a 3x3
  bottleneck, dropout 0.1 and a 1x1 classifier. Levels are given finest first.
- :class:`FCNHead`: mmseg's auxiliary head (one 3x3 conv, dropout 0.1, classifier) on one level.
- :class:`LightHead`: the earlier light UperNet-style head (64 channels, levels coarsest first).
- :class:`SimplePyramid`: BEiT/MAE's multi-level neck that turns one stride-16 map into strides
  4, 8, 16, 32 (two and one 2x2 transposed convs, identity, 2x2 max-pooling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POOL_SCALES = (1, 2, 3, 6)


def upsample(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """Bilinear resize to ``size`` (align_corners False, as mmseg's ``resize``)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Sequential):
    """mmcv's ConvModule with BN and ReLU: bias-free conv (kaiming-normal, fan-out), BN(1, 0), ReLU."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        nn.init.kaiming_normal_(self[0].weight, mode="fan_out", nonlinearity="relu")


class Classify(nn.Sequential):
    """mmseg's ``cls_seg``: Dropout2d, then a 1x1 conv initialised N(0, 0.01) with zero bias."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))
        nn.init.normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


class PPM(nn.Module):
    """Pyramid pooling: per scale, adaptive average pooling -> ConvBNReLU 1x1 -> bilinear back."""

    def __init__(self, cin: int, channels: int, scales: tuple[int, ...] = POOL_SCALES) -> None:
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(cin, channels, 1))
                                    for s in scales)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [upsample(stage(x), x.shape[-2:]) for stage in self.stages]


class UPerHead(nn.Module):
    """UperNet decode head on levels given finest first; logits at the finest level's resolution."""

    def __init__(self, in_dims: list[int], num_classes: int, channels: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        self.ppm = PPM(in_dims[-1], channels)
        self.bottleneck = ConvBNReLU(in_dims[-1] + len(POOL_SCALES) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(d, channels, 1) for d in in_dims[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_dims[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_dims) * channels, channels, 3)
        self.cls_seg = Classify(channels, num_classes, dropout)

    def forward(self, maps: list[Tensor]) -> Tensor:
        top = maps[-1]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, maps)]
        laterals.append(self.bottleneck(torch.cat([top, *self.ppm(top)], 1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down path
            laterals[i - 1] = laterals[i - 1] + upsample(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [upsample(o, size) for o in outs[1:]], 1))
        return self.cls_seg(fused)


class FCNHead(nn.Sequential):
    """mmseg's auxiliary FCNHead with one conv (no input concatenation)."""

    def __init__(self, cin: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__(ConvBNReLU(cin, channels, 3), Classify(channels, num_classes, dropout))


class LightHead(nn.Module):
    """The light UperNet-style head (levels coarsest first, no pooled level, no dropout): PPM on the
    coarsest, 1x1 laterals and 3x3 smoothing top-down, a 3x3 fuse, a 1x1 classifier."""

    def __init__(self, in_dims: list[int], num_classes: int, width: int = 64) -> None:
        super().__init__()
        top = in_dims[0]
        self.ppm = PPM(top, width)
        self.ppm_out = ConvBNReLU(top + width * len(POOL_SCALES), width, 3)
        self.lateral = nn.ModuleList(ConvBNReLU(d, width, 1) for d in in_dims[1:])
        self.smooth = nn.ModuleList(ConvBNReLU(width, width, 3) for _ in in_dims[1:])
        self.fuse = ConvBNReLU(width * len(in_dims), width, 3)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, maps: list[Tensor]) -> Tensor:
        top = maps[0]
        path = [self.ppm_out(torch.cat([top, *self.ppm(top)], 1))]
        for x, lateral in zip(maps[1:], self.lateral):
            path.append(lateral(x) + upsample(path[-1], x.shape[-2:]))
        outs = [path[0]] + [smooth(p) for p, smooth in zip(path[1:], self.smooth)]
        size = outs[-1].shape[-2:]
        return self.classifier(self.fuse(torch.cat([upsample(o, size) for o in outs], 1)))


class SimplePyramid(nn.Module):
    """One stride-16 map (B, D, h, w) -> [stride 4, 8, 16, 32] maps of D channels (finest first)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                 nn.ConvTranspose2d(dim, dim, 2, 2))
        self.up8 = nn.ConvTranspose2d(dim, dim, 2, 2)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.up4(x), self.up8(x), x, F.max_pool2d(x, 2, 2, ceil_mode=True)]
