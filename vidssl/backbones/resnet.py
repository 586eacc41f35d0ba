"""Video ResNets with torchvision's state-dict layout: R3D-18/34/50, MC3-18, R(2+1)D-18.

Architectures from Tran et al., "A Closer Look at Spatiotemporal Convolutions for Action
Recognition" (CVPR 2018, https://arxiv.org/abs/1711.11248); module names and shapes follow
torchvision ``models/video/resnet.py`` so its Kinetics-400 checkpoints load as they are.
"""

from __future__ import annotations

from typing import Optional, Sequence, Type, Union

from torch import Tensor, nn

from vidssl.backbones.base import VideoBackbone, scale_width
from vidssl.backbones.registry import register

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "Conv2Plus1D",
    "Conv3DNoTemporal",
    "Conv3DSimple",
    "VideoResNet",
    "mc3_18",
    "r2plus1d_18",
    "r3d_18",
    "r3d_34",
    "r3d_50",
]


class Conv3DSimple(nn.Conv3d):
    """A full 3x3x3 convolution (R3D; torchvision ``Conv3DSimple``)."""

    def __init__(self, in_planes: int, out_planes: int, midplanes: int = 0, stride: int = 1):
        super().__init__(in_planes, out_planes, (3, 3, 3), stride, padding=1, bias=False)

    @staticmethod
    def get_downsample_stride(stride: int) -> tuple[int, int, int]:
        """Stride of the 1x1x1 shortcut projection that matches this convolution's output."""
        return stride, stride, stride


class Conv2Plus1D(nn.Sequential):
    """A 1x3x3 spatial then 3x1x1 temporal convolution, BN and ReLU between (R(2+1)D).

    ``midplanes`` is chosen by the block so that the pair has the parameters of a full 3x3x3
    convolution (Tran et al. 2018, section 3.5; torchvision ``Conv2Plus1D``).
    """

    def __init__(self, in_planes: int, out_planes: int, midplanes: int, stride: int = 1):
        super().__init__(
            nn.Conv3d(in_planes, midplanes, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False),
            nn.BatchNorm3d(midplanes),
            nn.ReLU(inplace=True),
            nn.Conv3d(midplanes, out_planes, (3, 1, 1), (stride, 1, 1), (1, 0, 0), bias=False),
        )

    @staticmethod
    def get_downsample_stride(stride: int) -> tuple[int, int, int]:
        """Stride of the 1x1x1 shortcut projection that matches this convolution's output."""
        return stride, stride, stride


class Conv3DNoTemporal(nn.Conv3d):
    """A 1x3x3 convolution, spatial only (MC3's upper layers; torchvision ``Conv3DNoTemporal``)."""

    def __init__(self, in_planes: int, out_planes: int, midplanes: int = 0, stride: int = 1):
        super().__init__(
            in_planes, out_planes, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False
        )

    @staticmethod
    def get_downsample_stride(stride: int) -> tuple[int, int, int]:
        """Stride of the shortcut projection: spatial only, as the convolution."""
        return 1, stride, stride


ConvBuilder = Type[Union[Conv3DSimple, Conv2Plus1D, Conv3DNoTemporal]]


def _midplanes(inplanes: int, planes: int) -> int:
    # Parameters of a 3x3x3 conv (inplanes*planes*27) shared out over a 1x3x3 conv into M
    # channels plus a 3x1x1 conv out of them: M = 27*in*out / (9*in + 3*out) (torchvision).
    return max(1, (inplanes * planes * 3 * 3 * 3) // (inplanes * 3 * 3 + 3 * planes))


class BasicBlock(nn.Module):
    """Two 3D convolutions with a residual connection (torchvision video ``BasicBlock``)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        conv_builder: ConvBuilder,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
    ):
        super().__init__()
        midplanes = _midplanes(inplanes, planes)
        self.conv1 = nn.Sequential(
            conv_builder(inplanes, planes, midplanes, stride),
            nn.BatchNorm3d(planes),
            nn.ReLU(inplace=True),
        )
        self.conv2 = nn.Sequential(conv_builder(planes, planes, midplanes), nn.BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """Return ``relu(conv2(conv1(x)) + shortcut(x))``."""
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + residual)


class Bottleneck(nn.Module):
    """1x1x1 reduce, 3D convolution, 1x1x1 expand (x4), with a residual connection.

    torchvision video ``Bottleneck``; used by R3D-50 (as ResNet-50, He et al. 2016).
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        conv_builder: ConvBuilder,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
    ):
        super().__init__()
        # torchvision computes midplanes from (inplanes, planes) here too; only R(2+1)D uses it.
        midplanes = _midplanes(inplanes, planes)
        self.conv1 = nn.Sequential(
            nn.Conv3d(inplanes, planes, kernel_size=1, bias=False),
            nn.BatchNorm3d(planes),
            nn.ReLU(inplace=True),
        )
        self.conv2 = nn.Sequential(
            conv_builder(planes, planes, midplanes, stride),
            nn.BatchNorm3d(planes),
            nn.ReLU(inplace=True),
        )
        self.conv3 = nn.Sequential(
            nn.Conv3d(planes, planes * self.expansion, kernel_size=1, bias=False),
            nn.BatchNorm3d(planes * self.expansion),
        )
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """Return ``relu(conv3(conv2(conv1(x))) + shortcut(x))``."""
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + residual)


class BasicStem(nn.Sequential):
    """3x7x7 convolution, stride (1, 2, 2), BN, ReLU (torchvision ``BasicStem``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


class R2Plus1dStem(nn.Sequential):
    """1x7x7 conv into 45 channels, then a 3x1x1 temporal conv (torchvision ``R2Plus1dStem``)."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int):
        super().__init__(
            nn.Conv3d(in_channels, mid_channels, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False),
            nn.BatchNorm3d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid_channels, out_channels, (3, 1, 1), (1, 1, 1), (1, 0, 0), bias=False),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


class VideoResNet(VideoBackbone):
    """A video ResNet without its classifier (torchvision ``VideoResNet`` minus ``fc``).

    The stem downsamples space by 2 (no max-pool), ``layer2..4`` downsample time and space by 2
    (space only for ``Conv3DNoTemporal`` layers). State-dict keys: ``stem.*``, ``layer1..4.*``.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        conv_makers: the convolution of each of the four layers.
        layers: number of blocks per layer.
        stem: ``"basic"`` (:class:`BasicStem`) or ``"r2plus1d"`` (:class:`R2Plus1dStem`).
        width_mult: scales every channel count (1.0 = torchvision's).
        in_channels: channels of the input clips.
    """

    classifier_prefixes = ("fc.",)
    stem_conv = "stem.0"

    def __init__(
        self,
        block: Type[Union[BasicBlock, Bottleneck]],
        conv_makers: Sequence[ConvBuilder],
        layers: Sequence[int],
        stem: str = "basic",
        width_mult: float = 1.0,
        in_channels: int = 3,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.width_mult = width_mult
        self.inplanes = scale_width(64, width_mult)
        if stem == "basic":
            self.stem: nn.Module = BasicStem(in_channels, self.inplanes)
        elif stem == "r2plus1d":
            self.stem = R2Plus1dStem(in_channels, self.inplanes, scale_width(45, width_mult))
        else:
            raise ValueError(f"unknown stem {stem!r}; expected 'basic' or 'r2plus1d'")
        planes = [scale_width(c, width_mult) for c in (64, 128, 256, 512)]
        self.layer1 = self._make_layer(block, conv_makers[0], planes[0], layers[0], stride=1)
        self.layer2 = self._make_layer(block, conv_makers[1], planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, conv_makers[2], planes[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, conv_makers[3], planes[3], layers[3], stride=2)
        self.feature_dim = planes[3] * block.expansion
        self._initialize_weights()

    def _make_layer(
        self,
        block: Type[Union[BasicBlock, Bottleneck]],
        conv_builder: ConvBuilder,
        planes: int,
        blocks: int,
        stride: int,
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            # Shortcut "B" of He et al.: a 1x1x1 projection where the shape changes.
            downsample = nn.Sequential(
                nn.Conv3d(
                    self.inplanes,
                    planes * block.expansion,
                    kernel_size=1,
                    stride=conv_builder.get_downsample_stride(stride),
                    bias=False,
                ),
                nn.BatchNorm3d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, conv_builder, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, conv_builder) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _initialize_weights(self) -> None:
        # torchvision's initialisation: He-normal (fan_out) convolutions, BN at identity.
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Return the ``layer4`` map ``B x D x T' x H' x W'`` (``T' ~ T/8``, ``H' ~ H/16``)."""
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


@register
def r3d_18(width_mult: float = 1.0, in_channels: int = 3) -> VideoResNet:
    """R3D-18: 18-layer ResNet of 3x3x3 convolutions, ``D = 512 * width_mult``.

    Tran et al. 2018 (https://arxiv.org/abs/1711.11248); torchvision ``r3d_18`` layout, so its
    Kinetics-400 weights (``r3d_18-b3b3357e.pth``) load. 33,166,272 parameters at full width.
    """
    return VideoResNet(
        BasicBlock, [Conv3DSimple] * 4, [2, 2, 2, 2], "basic", width_mult, in_channels
    )


@register
def r3d_34(width_mult: float = 1.0, in_channels: int = 3) -> VideoResNet:
    """R3D-34: the R3D-18 design with ResNet-34's [3, 4, 6, 3] blocks, ``D = 512 * width_mult``.

    Tran et al. 2018 (https://arxiv.org/abs/1711.11248) report R3D-34; torchvision has no
    checkpoint for it, its keys follow torchvision's ``VideoResNet`` naming.
    """
    return VideoResNet(
        BasicBlock, [Conv3DSimple] * 4, [3, 4, 6, 3], "basic", width_mult, in_channels
    )


@register
def r3d_50(width_mult: float = 1.0, in_channels: int = 3) -> VideoResNet:
    """R3D-50: bottleneck blocks [3, 4, 6, 3] of 3x3x3 convolutions, ``D = 2048 * width_mult``.

    The 3D ResNet-50 of Hara et al. 2018 ("Can Spatiotemporal 3D CNNs Retrace the History of 2D
    CNNs and ImageNet?", https://arxiv.org/abs/1711.09577) with torchvision's ``BasicStem`` and
    ``VideoResNet``/``Bottleneck`` key naming (Hara's own checkpoints use other names).
    """
    return VideoResNet(
        Bottleneck, [Conv3DSimple] * 4, [3, 4, 6, 3], "basic", width_mult, in_channels
    )


@register
def mc3_18(width_mult: float = 1.0, in_channels: int = 3) -> VideoResNet:
    """MC3-18: 3D convolutions in ``layer1``, 2D (1x3x3) above, ``D = 512 * width_mult``.

    Tran et al. 2018 (https://arxiv.org/abs/1711.11248); torchvision ``mc3_18`` layout, so its
    Kinetics-400 weights (``mc3_18-a90a0ba3.pth``) load. 11,490,240 parameters at full width.
    """
    conv_makers = [Conv3DSimple] + [Conv3DNoTemporal] * 3
    return VideoResNet(BasicBlock, conv_makers, [2, 2, 2, 2], "basic", width_mult, in_channels)


@register
def r2plus1d_18(width_mult: float = 1.0, in_channels: int = 3) -> VideoResNet:
    """R(2+1)D-18: every 3D convolution factored into spatial + temporal, ``D = 512 * width_mult``.

    Tran et al. 2018 (https://arxiv.org/abs/1711.11248); torchvision ``r2plus1d_18`` layout, so
    its Kinetics-400 weights (``r2plus1d_18-91a641e6.pth``) load. 31,300,125 parameters at full
    width.
    """
    return VideoResNet(
        BasicBlock, [Conv2Plus1D] * 4, [2, 2, 2, 2], "r2plus1d", width_mult, in_channels
    )
