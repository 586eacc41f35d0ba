"""The 3D-ResNet of Hara et al. with its own state-dict layout, as SLIC and many SSL papers use it.

Source: kenshohara/3D-ResNets-PyTorch ``models/resnet.py`` (Hara, Kataoka and Satoh, "Can
Spatiotemporal 3D CNNs Retrace the History of 2D CNNs and ImageNet?", CVPR 2018).
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from vidssl.backbones.base import VideoBackbone, scale_width
from vidssl.backbones.registry import register

__all__ = ["HaraBasicBlock", "HaraResNet", "r3d_18_hara"]


def _conv3x3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class HaraBasicBlock(nn.Module):
    """Two 3x3x3 convolutions with a residual connection; Hara's ``BasicBlock`` key names.

    Keys: ``conv1``, ``bn1``, ``conv2``, ``bn2``, ``downsample.0`` (conv), ``downsample.1`` (BN).
    """

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None
    ):
        super().__init__()
        self.conv1 = _conv3x3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3x3(planes, planes)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """Return ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + residual)


class HaraResNet(VideoBackbone):
    """Hara et al.'s 3D-ResNet (basic blocks) without its ``fc`` classifier.

    Stem: a ``conv1_t_size x 7 x 7`` convolution, stride ``(conv1_t_stride, 2, 2)``, BN, ReLU,
    then a 3x3x3 stride-2 max-pool unless ``no_max_pool`` (Hara's ``--no_max_pool`` flag, which
    SLIC's 3D-ResNet-18 sets). Shortcut type B: a 1x1x1 conv + BN projection where the shape
    changes, identity elsewhere. ``layer2..4`` halve time and space.

    Args:
        layers: basic blocks per layer (``[2, 2, 2, 2]`` for ResNet-18).
        width_mult: scales every channel count (Hara's ``widen_factor``; 1.0 = 64..512).
        in_channels: channels of the input clips.
        conv1_t_size: temporal kernel of the stem (Hara's default 7).
        conv1_t_stride: temporal stride of the stem (Hara's default 1).
        no_max_pool: leave out the max-pool after the stem.
    """

    classifier_prefixes = ("fc.",)
    stem_conv = "conv1"

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        width_mult: float = 1.0,
        in_channels: int = 3,
        conv1_t_size: int = 7,
        conv1_t_stride: int = 1,
        no_max_pool: bool = True,
    ):
        super().__init__()
        planes = [scale_width(c, width_mult) for c in (64, 128, 256, 512)]
        self.in_channels = in_channels
        self.width_mult = width_mult
        self.inplanes = planes[0]
        self.conv1 = nn.Conv3d(
            in_channels,
            self.inplanes,
            kernel_size=(conv1_t_size, 7, 7),
            stride=(conv1_t_stride, 2, 2),
            padding=(conv1_t_size // 2, 3, 3),
            bias=False,
        )
        self.bn1 = nn.BatchNorm3d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (
            nn.Identity() if no_max_pool else nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        )
        self.layer1 = self._make_layer(planes[0], layers[0], stride=1)
        self.layer2 = self._make_layer(planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(planes[2], layers[2], stride=2)
        self.layer4 = self._make_layer(planes[3], layers[3], stride=2)
        self.feature_dim = planes[3]
        for m in self.modules():
            # Hara's initialisation: He-normal (fan_out) convolutions, BN at identity.
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv3d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm3d(planes),
            )
        layers = [HaraBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [HaraBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """Return the ``layer4`` map ``B x D x T' x H' x W'`` (``T' ~ T/8``, ``H' ~ H/16``)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


@register
def r3d_18_hara(
    width_mult: float = 1.0, in_channels: int = 3, no_max_pool: bool = True
) -> HaraResNet:
    """Hara et al.'s 3D-ResNet-18 as SLIC uses it: 7x7x7 stem, no max-pool, D = 512 * width_mult.

    kenshohara/3D-ResNets-PyTorch ``generate_model(18, no_max_pool=True)`` layout (``conv1``,
    ``bn1``, ``layer1..4``), so Hara-style checkpoints (``{"state_dict": ...}`` with ``module.``
    prefixes) load. Set ``no_max_pool=False`` for Hara's default stem with the max-pool.
    """
    return HaraResNet((2, 2, 2, 2), width_mult, in_channels, no_max_pool=no_max_pool)
