"""An RGB stream and a motion stream of one zoo layout: what two-stream methods share."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vidssl.methods.base import ConfigError, VideoSSLMethod

__all__ = ["TwoStreamMethod"]


class TwoStreamMethod(VideoSSLMethod):
    """A method with an RGB encoder and a motion encoder of the same zoo layout, one head each.

    ``self.backbone`` / ``self.projection`` encode RGB clips; ``self.motion_backbone`` (the same
    zoo name with ``motion_channels`` input channels) / ``self.motion_projection`` (or the RGB
    head with ``share_head``) encode motion fields ``batch["motion"][pos]``. Weights load into
    both streams, the motion stem by TSN's cross-modality initialisation
    (:func:`vidssl.backbones.build_two_stream`). Retrieval reads :meth:`encode_rgb` and
    :meth:`encode_motion` (``vidssl retrieval --features rgb|motion|both``), and a checkpoint
    loads back as a :class:`~vidssl.backbones.TwoStream` (its ``motion_backbone.*`` weights).
    ``setup("fit")`` stops with a :class:`ConfigError` when the data's motion has another
    channel count. Used by :class:`~vidssl.methods.GOCA` and
    :class:`~vidssl.methods.CrossModalContrast`.
    """

    motion_option = "data.init_args.motion (flow, mv or diff)"

    def __init__(
        self,
        backbone: str = "r3d_18",
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        weights: Optional[str] = None,
        motion_channels: int = 2,
        share_head: bool = False,
        **kwargs: Any,
    ):
        if isinstance(backbone, nn.Module):
            raise TypeError(f"{type(self).__name__} builds its RGB and motion backbones from a "
                            "zoo name; pass backbone as a name (vidssl.backbones.list())")
        if motion_channels < 1:
            raise ValueError(f"motion_channels must be >= 1, got {motion_channels} "
                             "(model.init_args.motion_channels)")
        super().__init__(backbone=backbone, backbone_kwargs=backbone_kwargs, weights=weights,
                         **kwargs)
        from vidssl.backbones import build

        self.motion_channels = motion_channels
        self.motion_backbone = build(backbone, weights=weights, in_channels=motion_channels,
                                     **(backbone_kwargs or {}))
        self.share_head = share_head
        self.motion_projection = (self.projection if share_head
                                  else self.build_projection_head(self.feature_dim))

    def encode_rgb(self, clips: torch.Tensor) -> torch.Tensor:
        """Return the RGB stream's backbone features ``B x D`` of clips ``B x 3 x T x H x W``."""
        return self.backbone(clips)

    def encode_motion(self, motion: torch.Tensor) -> torch.Tensor:
        """Return the motion stream's backbone features ``B x D`` of ``B x M x T x H x W``."""
        return self.motion_backbone(motion)

    def project(self, feats: torch.Tensor, modality: str = "rgb") -> torch.Tensor:
        """Return the L2-normalised head output ``z`` (``B x d``) of backbone features."""
        head = self.projection if modality == "rgb" else self.motion_projection
        return F.normalize(head(feats), dim=1)

    def setup(self, stage: str) -> None:
        """Run the base checks, and check that the data's motion has ``motion_channels``."""
        super().setup(stage)
        channels = getattr(self._datamodule(), "motion_channels", None)
        if stage == "fit" and isinstance(channels, int) and channels > 0 and (
            channels != self.motion_channels
        ):
            raise ConfigError(
                f"{type(self).__name__}(motion_channels={self.motion_channels}) but the data "
                f"module gives {channels}-channel motion; set model.init_args.motion_channels="
                f"{channels} (2 for flow or mv, 3 for diff)"
            )
