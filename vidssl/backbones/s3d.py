"""S3D (separable 3D Inception) with torchvision's state-dict layout and adaptive pooling.

Xie et al., "Rethinking Spatiotemporal Feature Learning: Speed-Accuracy Trade-offs in Video
Classification" (ECCV 2018, https://arxiv.org/abs/1712.04851); module names and shapes follow
torchvision ``models/video/s3d.py`` so its Kinetics-400 checkpoint loads.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from vidssl.backbones.base import VideoBackbone, scale_width
from vidssl.backbones.registry import register

__all__ = ["S3D", "SepInceptionBlock3D", "TemporalSeparableConv", "s3d"]

# torchvision's S3D batch norm (eps=1e-3, momentum=1e-3), as the TF original it was ported from.
_BatchNorm = partial(nn.BatchNorm3d, eps=0.001, momentum=0.001)


class ConvBNReLU(nn.Sequential):
    """Conv3d (no bias), BN, ReLU, keyed ``0.*``, ``1.*`` (torchvision ``Conv3dNormActivation``)."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: tuple[int, int, int] = (1, 1, 1),
        stride: tuple[int, int, int] = (1, 1, 1),
        padding: tuple[int, int, int] = (0, 0, 0),
    ):
        super().__init__(
            nn.Conv3d(in_planes, out_planes, kernel_size, stride, padding, bias=False),
            _BatchNorm(out_planes),
            nn.ReLU(inplace=True),
        )


class TemporalSeparableConv(nn.Sequential):
    """A ``1 x k x k`` then a ``k x 1 x 1`` conv, each with BN and ReLU (S3D's "sep-conv")."""

    def __init__(
        self, in_planes: int, out_planes: int, kernel_size: int, stride: int, padding: int
    ):
        k, s, p = kernel_size, stride, padding
        super().__init__(
            ConvBNReLU(in_planes, out_planes, (1, k, k), (1, s, s), (0, p, p)),
            ConvBNReLU(out_planes, out_planes, (k, 1, 1), (s, 1, 1), (p, 0, 0)),
        )


class SepInceptionBlock3D(nn.Module):
    """Inception block with separable 3x3x3 convolutions; output channels ``b0 + b1 + b2 + b3``.

    Branches: 1x1x1; 1x1x1 then sep-conv; 1x1x1 then sep-conv; 3x3x3 max-pool then 1x1x1
    (torchvision ``SepInceptionBlock3D``, Xie et al. 2018 figure 2).
    """

    def __init__(
        self,
        in_planes: int,
        b0_out: int,
        b1_mid: int,
        b1_out: int,
        b2_mid: int,
        b2_out: int,
        b3_out: int,
    ):
        super().__init__()
        self.out_planes = b0_out + b1_out + b2_out + b3_out
        self.branch0 = ConvBNReLU(in_planes, b0_out)
        self.branch1 = nn.Sequential(
            ConvBNReLU(in_planes, b1_mid), TemporalSeparableConv(b1_mid, b1_out, 3, 1, 1)
        )
        self.branch2 = nn.Sequential(
            ConvBNReLU(in_planes, b2_mid), TemporalSeparableConv(b2_mid, b2_out, 3, 1, 1)
        )
        self.branch3 = nn.Sequential(
            nn.MaxPool3d(kernel_size=(3, 3, 3), stride=1, padding=1), ConvBNReLU(in_planes, b3_out)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Concatenate the four branches along channels."""
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], 1)


# (b0_out, b1_mid, b1_out, b2_mid, b2_out, b3_out) of the nine blocks, torchvision's S3D (Mixed_3b
# to Mixed_5c of Inception-v1); "pool" marks the max-pools between them.
_S3D_BLOCKS = (
    (64, 96, 128, 16, 32, 32),
    (128, 128, 192, 32, 96, 64),
    "pool3",
    (192, 96, 208, 16, 48, 64),
    (160, 112, 224, 24, 64, 64),
    (128, 128, 256, 24, 64, 64),
    (112, 144, 288, 32, 64, 64),
    (256, 160, 320, 32, 128, 128),
    "pool2",
    (256, 160, 320, 32, 128, 128),
    (384, 192, 384, 48, 128, 128),
)


class S3D(VideoBackbone):
    """S3D without its classifier: torchvision ``S3D.features``, then adaptive average pooling.

    torchvision ends with a fixed ``AvgPool3d((2, 7, 7))``, tied to 224 px and >= 14 frames; here
    the pooling is adaptive, so any ``T >= 1`` and ``H, W >= 32`` work. For the same reason the
    last max-pool (2x2x2, stride 2) uses ``ceil_mode=True``: identical to torchvision's when the
    map reaching it has even size (16 or 32 frames, 224 px), and it keeps a map of one frame
    instead of failing. State-dict keys: ``features.*`` (``classifier.*`` is left out).

    Args:
        width_mult: scales every channel count (1.0 = torchvision's, ``D = 1024``).
        in_channels: channels of the input clips.
    """

    classifier_prefixes = ("classifier.",)
    stem_conv = "features.0.0.0"

    def __init__(self, width_mult: float = 1.0, in_channels: int = 3):
        super().__init__()
        self.in_channels = in_channels
        self.width_mult = width_mult

        def w(c: int) -> int:
            return scale_width(c, width_mult)

        layers: list[nn.Module] = [
            TemporalSeparableConv(in_channels, w(64), 7, 2, 3),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            ConvBNReLU(w(64), w(64)),
            TemporalSeparableConv(w(64), w(192), 3, 1, 1),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        ]
        planes = w(192)
        for spec in _S3D_BLOCKS:
            if spec == "pool3":
                layers.append(nn.MaxPool3d(kernel_size=3, stride=2, padding=1))
            elif spec == "pool2":
                layers.append(nn.MaxPool3d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                block = SepInceptionBlock3D(planes, *(w(c) for c in spec))
                layers.append(block)
                planes = block.out_planes
        self.features = nn.Sequential(*layers)
        self.feature_dim = planes

    def forward_features(self, x: Tensor) -> Tensor:
        """Return the Mixed_5c map ``B x D x T' x H' x W'`` (``T' ~ T/8``, ``H' ~ H/32``)."""
        return self.features(x)


@register
def s3d(width_mult: float = 1.0, in_channels: int = 3) -> S3D:
    """S3D (Xie et al. 2018, https://arxiv.org/abs/1712.04851), ``D = 1024`` at full width.

    torchvision ``s3d`` layout, so its Kinetics-400 weights (``s3d-d76dad2f.pth``) load;
    7,910,048 parameters at full width (8,320,048 with torchvision's 400-class classifier).
    """
    return S3D(width_mult, in_channels)
