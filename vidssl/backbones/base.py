"""The `VideoBackbone` contract shared by every model of the zoo, and the width helper.

A backbone maps float clips ``B x C x T x H x W`` to pooled features ``B x D``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VideoBackbone", "scale_width"]


def scale_width(channels: int, width_mult: float) -> int:
    """Return ``channels * width_mult`` rounded to the nearest integer, at least 1.

    Every builder of the zoo passes each channel count of the reference architecture through this
    function, so ``width_mult=1.0`` reproduces the reference exactly and ``width_mult=1/16`` turns
    the 64/128/256/512 channels of a ResNet into 4/8/16/32 (narrow models for CPUs and tests).
    """
    if width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    return max(1, int(round(channels * width_mult)))


class VideoBackbone(nn.Module):
    """Base class of the zoo: a video encoder with a pooled-feature ``forward``.

    Subclasses set ``feature_dim`` and ``in_channels`` and implement :meth:`forward_features`;
    the spatio-temporal average pooling of :meth:`forward` is adaptive, so any clip with
    ``T >= 1`` frames and ``H, W >= 32`` pixels works (as torchvision's ``VideoResNet``, whose
    ``AdaptiveAvgPool3d((1, 1, 1))`` this reproduces; see ``torchvision/models/video/resnet.py``).

    Attributes:
        feature_dim: ``D``, the size of the pooled features (and channels of the feature map).
        in_channels: ``C`` expected by the first convolution (3 for RGB).
        classifier_prefixes: state-dict key prefixes of the classifier the reference
            implementation has and the backbone leaves out (``fc.`` for the ResNets,
            ``classifier.`` for S3D); :func:`vidssl.backbones.load_backbone_weights` skips them.
        stem_conv: name of the first convolution, the only module that sees the ``C`` input
            channels (``"stem.0"`` for the torchvision-layout ResNets, ``"features.0.0.0"`` for
            S3D, ``"conv1"`` for Hara's ResNet; ``None`` when unknown). Weights with another
            number of input channels load into it by the cross-modality initialisation
            (:func:`vidssl.backbones.load_backbone_weights`), and
            :class:`vidssl.backbones.MotionStem` builds a second stem of the same shape.
    """

    feature_dim: int
    in_channels: int = 3
    classifier_prefixes: tuple[str, ...] = ()
    stem_conv: str | None = None

    def forward_features(self, x: Tensor) -> Tensor:
        """Return the last feature map ``B x D x T' x H' x W'`` of clips ``B x C x T x H x W``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Return pooled features ``B x D`` of float clips ``B x C x T x H x W``."""
        self._check_input(x)
        features = self.forward_features(x)
        return torch.flatten(F.adaptive_avg_pool3d(features, 1), 1)

    def _check_input(self, x: Tensor) -> None:
        # The most common mistake is handing over the DataLoader's uint8 B x T x H x W x C clips;
        # say so instead of letting a convolution fail with a shape message about weights.
        if x.ndim != 5 or x.shape[1] != self.in_channels or not x.is_floating_point():
            raise ValueError(
                f"{type(self).__name__} expects float clips B x C x T x H x W with "
                f"C={self.in_channels}, got a {x.dtype} tensor of shape {tuple(x.shape)}; "
                "uint8 B x T x H x W x C batches must be augmented/normalised first "
                "(VideoDataModule.augment)"
            )
