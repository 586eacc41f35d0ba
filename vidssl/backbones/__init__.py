"""The backbone zoo: 3D CNNs for video behind one registry (``build``, ``list``).

Every model is a :class:`VideoBackbone`: float ``B x C x T x H x W`` in, ``B x D`` features out.
"""

from vidssl.backbones.base import VideoBackbone, scale_width
from vidssl.backbones.hara import HaraResNet, r3d_18_hara
from vidssl.backbones.motion import (
    MOTION_INPUTS,
    MotionStem,
    SharedEncoder,
    TwoStream,
    build_two_stream,
)
from vidssl.backbones.registry import UnknownBackboneError, build, list_backbones, register
from vidssl.backbones.resnet import VideoResNet, mc3_18, r2plus1d_18, r3d_18, r3d_34, r3d_50
from vidssl.backbones.s3d import S3D, s3d
from vidssl.backbones.weights import (
    WeightsMismatchError,
    cross_modality_stem,
    load_backbone_weights,
)

# The short name the docs use (`vidssl.backbones.list()`, as timm's `list_models`). It is kept out
# of __all__ so that `from vidssl.backbones import *` never shadows the builtin `list`.
list = list_backbones

__all__ = [
    "MOTION_INPUTS",
    "HaraResNet",
    "MotionStem",
    "S3D",
    "SharedEncoder",
    "TwoStream",
    "UnknownBackboneError",
    "VideoBackbone",
    "VideoResNet",
    "WeightsMismatchError",
    "build",
    "build_two_stream",
    "cross_modality_stem",
    "list_backbones",
    "load_backbone_weights",
    "mc3_18",
    "r2plus1d_18",
    "r3d_18",
    "r3d_18_hara",
    "r3d_34",
    "r3d_50",
    "register",
    "s3d",
    "scale_width",
]
