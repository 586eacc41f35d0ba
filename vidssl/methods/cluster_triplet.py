"""SLIC: triplet learning guided by iterative clustering, with a temporal discrimination loss.

Positives come from the anchor's pseudo-class (``ClusterBatchSampler``), negatives are mined in
the batch among other pseudo-classes; the ``PseudoLabels`` callback re-clusters with FINCH.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from vidssl.losses.mining import (
    cluster_triplet_loss,
    labels_or_instances,
    temporal_discrimination_loss,
)
from vidssl.methods.base import VideoSSLMethod

__all__ = ["ClusterTriplet"]

_SLIC = "github.com/rvl-lab-utoronto/video_similarity_search"


class ClusterTriplet(VideoSSLMethod):
    """SLIC: triplets from iterative clustering plus temporal discrimination.

    Khorasgani et al., CVPR 2022, "SLIC: Self-Supervised Learning with Iterative Clustering for
    Human Action Videos", following its official code (``{slic}``).

    A batch holds pairs ``(a, p)`` from ``ClusterBatchSampler``: ``p`` is ``a`` itself (another,
    non-overlapping clip) with probability ``p_same``, else another video of ``a``'s cluster.
    View 0 is the anchor clip, view 1 the positive (:meth:`positive_view`), view 2 the anchor's
    frames augmented again (``a'``): ``views = ("anchor", "positive", "anchor_repeat")``, which
    the data module follows (``vidssl fit`` links it; no data setting needed). All views go through
    backbone and head in one pass (one BN batch), as SLIC does. The loss is

    - instance triplet loss: anchors and positives are stacked (``2B`` rows); every pair of rows
      with the same pseudo-label is an anchor-positive pair; its negative is drawn among rows
      of other pseudo-labels with ``d(a, n) < d(a, p) + m1``, or is the closest such row if none
      is (``vidssl.losses.mining.cluster_triplet_loss``); ``d = 1 - cos``;
    - plus ``temporal_weight`` times the temporal discrimination loss
      ``relu(d(a, a') - d(a, p) + m2)``: the same clip re-augmented must be closer than the
      positive.

    A video without a pseudo-label (before the first clustering, or ``-1``) is its own class.
    Negatives are mined in each rank's batch, as SLIC does under DDP.

    Defaults and their sources in the official code:

    - ``backbone="r3d_18_hara"``: ``MODEL.ARCH: 3dresnet``, ``RESNET.MODEL_DEPTH: 18``,
      ``CONV1_T_SIZE: 7``, ``NO_MAX_POOl: true`` (``config/custom_configs/
      resnet_ucf_itercluster_flow.yaml``).
    - head ``512 -> 2048 -> BN -> ReLU -> 128``: ``RESNET.HIDDEN_LAYER = 2048``, ``OUT_DIM = 128``
      (``config/default_params.py``).
    - ``margin=0.2`` (m1): ``LOSS.MARGIN: 0.2``; cosine distance: ``LOSS.DIST_METRIC =
      'cosine'``; semi-hard mining: ``DATASET.SAMPLING_STRATEGY: 'random_semi_hard'``
      (``loss/triplet_loss.py``).
    - ``temporal_margin=0.04`` (m2), ``temporal_weight=1.0``: ``LOSS.LOCAL_LOCAL_MARGIN = 0.04``,
      ``LOSS.LOCAL_LOCAL_WEIGHT = 1.0``, on with ``LOSS.LOCAL_LOCAL_CONTRAST: True``.
    - SGD, ``lr=0.1``, ``momentum=0.5``: ``OPTIM.LR: 0.1``, ``OPTIM.MOMENTUM: 0.5``; no weight
      decay: ``online_train.py`` builds ``optim.SGD(params, lr, momentum)`` (``OPTIM.WD`` is
      only passed to Adam); constant learning rate: ``OPTIM.SCHEDULE = []``.
    - re-clustering (``pseudo_label_defaults``): FINCH (``ITERCLUSTER.METHOD: finch``), finest
      partition (``ITERCLUSTER.FINCH_PARTITION = 0``), every 5 epochs
      (``ITERCLUSTER.INTERVAL = 5``) from epoch 0 (``ITERCLUSTER.WARMUP_EPOCHS = 0``), on the
      projection outputs (``get_embeddings_and_labels`` embeds with the whole model).
    - ``p_same`` of the sampler: 0.2 on UCF101, 0.5 on Kinetics (``DATASET.
      POSITIVE_SAMPLING_P``), set on ``PseudoLabels`` / ``ClusterBatchSampler``.

    Not copied: the official code is reported (vidssl issue 5) to give each video the label of
    the video before it, an off-by-one between the order of the clustered embeddings and the
    dataset order. Here a video's label is always the one clustered from its own features
    (``PseudoLabels`` keys every feature by the true dataset index).

    Not included yet: SLIC's optical-flow positives (``POS_CHANNEL_REPLACE``). Override
    :meth:`positive_view` to return a flow clip of the positive instead of its RGB clip.

    Args:
        margin: triplet margin ``m1``.
        temporal_margin: temporal discrimination margin ``m2``.
        temporal_weight: weight of the temporal discrimination loss; ``0`` turns it off and the
            method then needs only 2 views (``views = ("anchor", "positive")``).
        backbone, ...: as ``VideoSSLMethod``.
    """

    views = ("anchor", "positive", "anchor_repeat")
    pseudo_label_defaults: Dict[str, Any] = {
        "method": "finch",
        "level": 0,
        "every_n_epochs": 5,
        "start_epoch": 0,
        "features": "projection",
    }

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "r3d_18_hara",
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        weights: Optional[str] = None,
        margin: float = 0.2,
        temporal_margin: float = 0.04,
        temporal_weight: float = 1.0,
        proj_hidden_dim: Optional[int] = 2048,
        proj_output_dim: int = 128,
        proj_num_layers: int = 2,
        proj_batch_norm: bool = True,
        optimizer: str = "sgd",
        lr: float = 0.1,
        weight_decay: float = 0.0,
        momentum: float = 0.5,
        exclude_bias_and_norm: bool = False,
        warmup_epochs: float = 0.0,
        lr_schedule: str = "constant",
        min_lr_ratio: float = 0.0,
    ):
        super().__init__(
            backbone=backbone,
            backbone_kwargs=backbone_kwargs,
            weights=weights,
            proj_hidden_dim=proj_hidden_dim,
            proj_output_dim=proj_output_dim,
            proj_num_layers=proj_num_layers,
            proj_batch_norm=proj_batch_norm,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            exclude_bias_and_norm=exclude_bias_and_norm,
            warmup_epochs=warmup_epochs,
            lr_schedule=lr_schedule,
            min_lr_ratio=min_lr_ratio,
        )
        if margin < 0 or temporal_margin < 0 or temporal_weight < 0:
            raise ValueError(
                "margin, temporal_margin and temporal_weight must be >= 0, got "
                f"{margin}, {temporal_margin}, {temporal_weight}"
            )
        self.margin = margin
        self.temporal_margin = temporal_margin
        self.temporal_weight = temporal_weight
        # The re-augmented anchor is read only by the temporal loss.
        self.views = ("anchor", "positive", "anchor_repeat") if temporal_weight > 0 else (
            "anchor", "positive")

    def positive_view(self, batch: Dict[str, Any]) -> torch.Tensor:
        """Return the positive clips ``B x C x T x H x W`` (view 1).

        The hook for other positive modalities: SLIC replaces the positive's RGB clip by its
        optical flow with some probability; a subclass returns that clip here.
        """
        return batch["views"][1]

    def compute_loss(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Triplet loss on pseudo-label pairs plus the temporal discrimination loss."""
        views = batch["views"]
        clips = [views[0], self.positive_view(batch)]
        if self.temporal_weight > 0:
            clips.append(views[2])
        b = views[0].shape[0]
        z = self.projection(self.backbone(torch.cat(clips, dim=0)))
        za, zp = z[:b], z[b : 2 * b]
        index = batch["index"]
        positive_index = batch.get("positive_index", index)
        labels = torch.cat(
            [
                labels_or_instances(self.pseudo_labels, index),
                labels_or_instances(self.pseudo_labels, positive_index),
            ]
        )
        sel = cluster_triplet_loss(torch.cat([za, zp]), labels, self.margin)
        out = {
            "triplet_loss": sel.loss.detach(),
            "num_triplets": torch.tensor(float(sel.anchor.numel()), device=z.device),
            "same_video_rate": (positive_index == index).float().mean(),
        }
        loss = sel.loss
        if self.temporal_weight > 0:
            temporal = temporal_discrimination_loss(za, z[2 * b :], zp, self.temporal_margin)
            out["temporal_loss"] = temporal.detach()
            loss = loss + self.temporal_weight * temporal
        out["loss"] = loss
        return out


ClusterTriplet.__doc__ = ClusterTriplet.__doc__.replace("{slic}", _SLIC)
