"""A small CNN trained from scratch: the baseline a practitioner would use instead of a pretrained encoder.

It stands in for an encoder in the fine-tuning protocol (``codemae finetune --cnn PX``), so it trains
on exactly the same K-shot draws with the same optimiser, schedule, head and test set as every encoder.
It has a single layer id (no layer-wise lr decay) and no drop path.
"""

from __future__ import annotations

from torch import Tensor, nn

WIDTHS = (32, 64, 128, 128)


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Per-modality first conv block, then shared conv blocks with 2x2 max-pooling between them
    (widths 32-64-128-128: 64 px in, an 8 x 8 map of 128 channels out); the final map comes out as
    (B, H*W, C) tokens, the shape the fine-tuning classifier pools."""

    def __init__(self, img_size: int, channels: dict[str, int], widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        self.img_size, self.channels, self.embed_dim = img_size, dict(channels), widths[-1]
        self.stems = nn.ModuleDict({m: conv_block(c, widths[0]) for m, c in channels.items()})
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.MaxPool2d(2), conv_block(cin, cout)]
        self.body = nn.Sequential(*layers)

    num_layers = 0  # one layer id for everything: the fine-tuning lr is not decayed by depth

    def layer_id(self, name: str) -> int:
        return 0

    def forward(self, image: Tensor, modality: str) -> Tensor:
        return self.body(self.stems[modality](image)).flatten(2).transpose(1, 2)


class CNNMethod(nn.Module):
    """The evaluation interface of a pretrained method (``encoder``, ``encode``) around a fresh SmallCNN."""

    def __init__(self, img_size: int, channels: dict[str, int]) -> None:
        super().__init__()
        self.encoder = SmallCNN(img_size, channels)

    def encode(self, images: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.encoder(x, m) for m, x in images.items()}
