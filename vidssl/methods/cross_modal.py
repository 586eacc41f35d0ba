"""Contrastive learning within and across an RGB stream and a motion stream (CMC, MaCLR)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from vidssl.losses import nt_xent
from vidssl.methods.settings import Head
from vidssl.methods.simclr import SimCLR
from vidssl.methods.two_stream import TwoStreamMethod

__all__ = ["CrossModalContrast"]


class CrossModalContrast(TwoStreamMethod):
    """Teach the RGB stream motion: contrast RGB clips against the motion of their own video.

    Two encoders of one zoo layout (:class:`~vidssl.methods.two_stream.TwoStreamMethod`): RGB
    clips ``r`` and their motion fields ``m`` (flow, motion vectors or frame differences of the
    same frames, ``batch["motion"]``), each through its own backbone and projection head. Views
    0 and 1 are two clips of a video (``views = ("anchor", "positive")``), and every view comes
    with its motion (``motion_views = (0, 1)``). With ``nce(a, b)`` SimCLR's NT-Xent over the
    ``2B`` rows of ``a`` and ``b`` (row ``i`` of ``a`` and of ``b`` positives of each other, the
    other ``2B - 2`` rows negatives; :func:`vidssl.losses.nt_xent`, DDP-gathered), the loss is

        rgb_weight    * nce(r0, r1)
      + motion_weight * nce(m0, m1)
      + cross_weight  * (nce(r0, m1) + nce(m0, r1)) / 2

    The cross term is CMC's (Tian et al., ECCV 2020, "Contrastive Multiview Coding"): what the
    RGB clip of a video and the motion of another of its clips share is how it moves, so matching
    them across the batch needs motion features in the RGB stream, not the scene. MaCLR (Xiao et
    al., ECCV 2022, "MaCLR: Motion-aware Contrastive Learning of Representations for Videos")
    adds this cross-modal term to an RGB-RGB contrastive loss; its released settings
    (github.com/amazon-science/self-supervised-maclr, ``slowfast/config/defaults.py``) weigh it
    1 (``CONTRASTIVE_FLOW_WEIGHT``) and keep the flow-flow term as an option, off
    (``FLOW_INST_DISC = False``). Retrieval and fine-tuning use the RGB stream alone.

    Defaults and their sources:

    - ``cross_weight=1.0``: MaCLR's ``CONTRASTIVE_FLOW_WEIGHT``.
    - ``motion_weight=1.0`` (MaCLR: 0) and ``rgb_weight=0.0`` (MaCLR: 1): ours, measured on
      the synthetic collection whose videos each have their own look
      (docs/benchmarks.md, "Cross-modal contrast"): with the cross term alone the RGB
      stream stays at its start (an RGB clip can find its flow by what both show without
      motion: the moving object's size and place); with the motion-motion term the flow
      stream's code becomes a motion code the RGB stream must predict. The RGB-RGB term
      rewards the scene, which tells these videos apart: with it (MaCLR's terms, or all
      three) the RGB stream ends below its start too. Set ``rgb_weight=1, motion_weight=0``
      for MaCLR's terms.
    - ``temperature=0.1``: MaCLR's ``INFONCE_TEMPERATURE`` (and SimCLR's).
    - head ``D -> 2048 -> BN -> ReLU -> 128`` for each stream: MaCLR's
      ``CONTRASTIVE_HEAD_LAYERS 2``, ``HIDDEN_DIM 2048``, ``CODE_DIM 128``.
    - optimiser (``default_optim``): SimCLR's, as the loss is SimCLR's NT-Xent.

    Not MaCLR's: its negatives come from a MoCo queue of 65536 keys with momentum encoders
    (``CONTRASTIVE_POOL_SIZE``, ``CONTRASTIVE_MOMENTUM 0.999``); here they are the batch's (all
    ranks' under DDP), and the cross-modal NT-Xent also counts the other rows of the anchor's
    own modality among its negatives. Its motion pathway is a thinner network (width / 8) on
    flow; here both streams have one layout.

    Logged: ``train/loss_rgb``, ``train/loss_motion``, ``train/loss_cross`` (each unweighted).

    Args:
        backbone: zoo name of both streams (the motion one with ``motion_channels`` inputs).
        backbone_kwargs: extra arguments for ``vidssl.backbones.build`` (e.g. ``width_mult``).
        weights: weights for both streams (the motion stem by TSN's cross-modality
            initialisation).
        motion_channels: channels of ``batch["motion"]`` (2: flow / motion vectors; 3: diff).
        rgb_weight: weight of the RGB-RGB term.
        motion_weight: weight of the motion-motion term.
        cross_weight: weight of the RGB-motion term.
        temperature: NT-Xent temperature of every term.
        gather_negatives: take negatives from every rank under DDP (as SimCLR).
        share_head: one projection head for both modalities.
        **kwargs: ``VideoSSLMethod``'s ``head`` (both heads) and ``optim``.
    """

    views = ("anchor", "positive")
    motion_views = (0, 1)
    motion_option = "CrossModalContrast reads the motion of both clips"

    # Sources: the class docstring ("Defaults and their sources").
    default_head = Head(hidden_dim=2048, output_dim=128, num_layers=2, batch_norm=True)
    default_optim = SimCLR.default_optim

    def __init__(
        self,
        backbone: str = "r3d_18",
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        weights: Optional[str] = None,
        motion_channels: int = 2,
        rgb_weight: float = 0.0,
        motion_weight: float = 1.0,
        cross_weight: float = 1.0,
        temperature: float = 0.1,
        gather_negatives: bool = True,
        share_head: bool = False,
        **kwargs: Any,
    ):
        weights_ = {"rgb_weight": rgb_weight, "motion_weight": motion_weight,
                    "cross_weight": cross_weight}
        for name, value in weights_.items():
            if not value >= 0:  # also catches NaN
                raise ValueError(f"{name} must be >= 0, got {value} (model.init_args.{name})")
        if not any(weights_.values()):
            raise ValueError("CrossModalContrast needs a term: rgb_weight, motion_weight and "
                             "cross_weight are all 0")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature} "
                             "(model.init_args.temperature)")
        super().__init__(backbone=backbone, backbone_kwargs=backbone_kwargs, weights=weights,
                         motion_channels=motion_channels, share_head=share_head, **kwargs)
        self.rgb_weight = rgb_weight
        self.motion_weight = motion_weight
        self.cross_weight = cross_weight
        self.temperature = temperature
        self.gather_negatives = gather_negatives

    def _embed(self, encoder: nn.Module, head: nn.Module, a: torch.Tensor, b: torch.Tensor):
        # Both clips in one backbone pass: one BN batch of 2B per modality, as SimCLR's views.
        return head(encoder(torch.cat([a, b], dim=0))).chunk(2, dim=0)

    def compute_loss(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Return the weighted NT-Xent terms of one batch (see the class docstring)."""
        views, motion = batch["views"], batch["motion"]
        r0, r1 = self._embed(self.backbone, self.projection, views[0], views[1])
        m0, m1 = self._embed(self.motion_backbone, self.motion_projection, motion[0], motion[1])

        def nce(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return nt_xent(a, b, self.temperature, gather=self.gather_negatives)

        # Every term is computed and logged, weighted or not: the unweighted ones show what
        # the streams learn on their own (an RGB-RGB loss that falls with rgb_weight=0 means
        # the RGB stream learns what tells clips apart anyway).
        terms = {"loss_rgb": nce(r0, r1), "loss_motion": nce(m0, m1),
                 "loss_cross": (nce(r0, m1) + nce(m0, r1)) / 2}
        loss = (self.rgb_weight * terms["loss_rgb"] + self.motion_weight * terms["loss_motion"]
                + self.cross_weight * terms["loss_cross"])
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}
