"""SLIC: triplet learning guided by iterative clustering, with a temporal discrimination loss.

Positives come from the anchor's pseudo-class (``ClusterBatchSampler``), negatives are mined in
the batch among other pseudo-classes; the ``PseudoLabels`` callback re-clusters with FINCH.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import numpy as np
import torch
from torch import nn

from vidssl.backbones.motion import MOTION_INPUTS, MotionStem
from vidssl.losses.mining import (
    cluster_triplet_loss,
    labels_or_instances,
    temporal_discrimination_loss,
)
from vidssl.methods.base import ConfigError, UsesPseudoLabels, VideoSSLMethod
from vidssl.methods.settings import Head, Optimization

__all__ = ["ClusterTriplet"]

_SLIC = "github.com/rvl-lab-utoronto/video_similarity_search"


class ClusterTriplet(UsesPseudoLabels, VideoSSLMethod):
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
    - head (``default_head``) ``512 -> 2048 -> BN -> ReLU -> 128``: ``RESNET.HIDDEN_LAYER =
      2048``, ``OUT_DIM = 128`` (``config/default_params.py``).
    - ``margin=0.2`` (m1): ``LOSS.MARGIN: 0.2``; cosine distance: ``LOSS.DIST_METRIC =
      'cosine'``; semi-hard mining: ``DATASET.SAMPLING_STRATEGY: 'random_semi_hard'``
      (``loss/triplet_loss.py``).
    - ``temporal_margin=0.04`` (m2), ``temporal_weight=1.0``: ``LOSS.LOCAL_LOCAL_MARGIN = 0.04``,
      ``LOSS.LOCAL_LOCAL_WEIGHT = 1.0``, on with ``LOSS.LOCAL_LOCAL_CONTRAST: True``.
    - ``default_optim``: SGD, ``lr=0.1``, ``momentum=0.5``: ``OPTIM.LR: 0.1``,
      ``OPTIM.MOMENTUM: 0.5``; no weight decay: ``online_train.py`` builds
      ``optim.SGD(params, lr, momentum)`` (``OPTIM.WD`` is only passed to Adam); constant
      learning rate: ``OPTIM.SCHEDULE = []``.
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

    Motion views (SLIC's flow positives, ``DATASET.POS_CHANNEL_REPLACE``), off by default
    (``motion_prob=0``). What the official code does (``datasets/triplets_dataset.py
    __getitem__`` and ``_load_clip``, ``datasets/dataset_utils.py construct_net_input``):

    - the anchor is always RGB (``_load_clip(anchor, use_channel_ext=False)``); the positive and
      the re-augmented anchor ``a'`` are each loaded with ``pos_channel_replace=True``, and EACH
      draws its own ``np.random.choice(['replace', 'rgb'], p=[0.25, 0.75])``
      (``PROB_POS_CHANNEL_REPLACE: 0.25``, ``resnet_ucf_itercluster_flow.yaml``), so the two are
      replaced independently, not together: a sample has both replaced with probability
      ``0.25 ** 2``. Here likewise: ``motion_prob`` is the probability of each view, drawn per
      sample and per view (``motion_views = (1, 2)``: the positive and ``a'``; ``(1,)`` when
      ``temporal_weight=0``);
    - a replaced clip is the flow of the same frames (``optical_u``: the x component of TV-L1
      flow stored as a grey JPEG), through the same spatial transform with the same random
      parameters as the RGB clip it replaces, copied to 3 channels and normalised with the
      RGB's ImageNet mean and std; one shared encoder. ``motion_input="x3"`` reproduces this
      input (:class:`vidssl.backbones.MotionStem`). Differences of the data side
      (docs/motion.md): a horizontal flip negates x here (the official flip mirrors the grey
      image and keeps the sign), colour jitter, grey-scale and blur are not applied to motion
      here (the official ``spatial_transform`` holds them and runs them on the flow image
      too), and vectors are in pixels of the output crop (the official resize does not
      scale them);
    - ``motion_input="xy"`` (not in SLIC) keeps both components: a second stem convolution
      for ``motion_channels`` inputs feeds the shared trunk (:class:`MotionStem`), initialised
      from the RGB stem by TSN's cross-modality initialisation.

    The per-sample draws use a generator seeded from ``torch.initial_seed()`` (which
    Lightning's ``seed_everything`` sets), the epoch, the batch index and the rank, not the
    global RNG stream, so a resumed run draws as the uninterrupted one and the augmentation's
    random stream is left as it was. ``compute_loss`` puts the draws in
    ``batch["motion_mask"]`` (``{pos: bool B}``) and logs ``train/motion_fraction``, the share
    of the positive and ``a'`` clips replaced. Training stops at start-up
    (:class:`~vidssl.methods.base.ConfigError`) when ``motion_prob > 0`` and the data module
    gives no motion, or motion with another channel count than ``motion_channels``.

    Besides the loss terms, ``compute_loss`` logs ``train/dist_same`` and ``train/dist_other``
    (:func:`vidssl.losses.mining.label_distances`: the mean ``d`` between the batch's rows of
    the same and of other pseudo-classes). When both sink toward 0 and stay equal the embedding
    has collapsed to one direction and the triplet loss sits at its margin. Training can leave
    that plateau late: on a collection whose classes differ only by motion it lasted tens of
    epochs, with the true classes or a motion teacher's clusters as labels, at a point that
    varies from run to run (docs/benchmarks.md, "SLIC on a motion teacher's clusters, 100
    epochs"). Judge a run by when ``train/dist_other`` leaves ``train/dist_same``.

    Retrieval on motion (``vidssl retrieval --features motion|both``) embeds motion fields
    through :meth:`encode_motion`, in the same input format.

    Args:
        margin: triplet margin ``m1``.
        temporal_margin: temporal discrimination margin ``m2``.
        temporal_weight: weight of the temporal discrimination loss; ``0`` turns it off and the
            method then needs only 2 views (``views = ("anchor", "positive")``).
        motion_prob: probability that the positive, and independently ``a'``, is replaced by
            its motion field, per sample; ``0`` (the default, as the official
            ``POS_CHANNEL_REPLACE = False`` of ``config/default_params.py``) trains on RGB only;
            SLIC's flow config uses ``0.25``.
        motion_input: ``"x3"`` (SLIC: the x component copied to 3 channels through the RGB
            stem) or ``"xy"`` (every motion channel through an own stem conv feeding the
            shared trunk).
        motion_channels: ``M`` of the data module's motion (2 for flow and motion vectors, 3
            for frame differences; ``"x3"`` needs 2).
        backbone: as ``VideoSSLMethod``, with SLIC's default.
        **kwargs: ``VideoSSLMethod``'s (``backbone_kwargs``, ``weights``, ``head``, ``optim``).
    """

    views = ("anchor", "positive", "anchor_repeat")
    pseudo_label_defaults: Dict[str, Any] = {
        "method": "finch",
        "level": 0,
        "every_n_epochs": 5,
        "start_epoch": 0,
        "features": "projection",
    }

    # Sources: the class docstring ("Defaults and their sources").
    default_head = Head(hidden_dim=2048, output_dim=128, num_layers=2, batch_norm=True)
    default_optim = Optimization(
        optimizer="sgd", lr=0.1, weight_decay=0.0, momentum=0.5, exclude_bias_and_norm=False,
        warmup_epochs=0.0, lr_schedule="constant", min_lr_ratio=0.0,
    )

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "r3d_18_hara",
        margin: float = 0.2,
        temporal_margin: float = 0.04,
        temporal_weight: float = 1.0,
        motion_prob: float = 0.0,
        motion_input: str = "x3",
        motion_channels: int = 2,
        **kwargs: Any,
    ):
        super().__init__(backbone=backbone, **kwargs)
        self.init_pseudo_labels()
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
        if not 0.0 <= motion_prob <= 1.0:
            raise ValueError(
                f"motion_prob must be in [0, 1], got {motion_prob} (model.init_args.motion_prob)"
            )
        if motion_input not in MOTION_INPUTS:
            raise ValueError(
                f"unknown motion_input {motion_input!r}; valid: {', '.join(MOTION_INPUTS)} "
                "(model.init_args.motion_input)"
            )
        self.motion_prob = motion_prob
        self.motion_input = motion_input
        self.motion_channels = motion_channels
        # Positive and re-augmented anchor: the views SLIC's pos_channel_replace applies to.
        self.motion_views = tuple(range(1, len(self.views))) if motion_prob > 0 else ()
        self.motion_option = f"model.init_args.motion_prob={motion_prob}"
        # "x3" has no weights, so it is always there (to embed motion in evaluation); the "xy"
        # stem only when training uses it (a parameter without gradient would stop DDP).
        self.motion_stem: Optional[MotionStem] = None
        if motion_input == "x3" or motion_prob > 0:
            self.motion_stem = MotionStem(self.backbone, motion_input, motion_channels)
        self._batch_idx = 0

    def setup(self, stage: str) -> None:
        """Run the base checks, and check that the data's motion has ``motion_channels``."""
        super().setup(stage)
        dm = self._datamodule()
        channels = getattr(dm, "motion_channels", None)
        if stage == "fit" and self.motion_views and isinstance(channels, int) and (
            channels != self.motion_channels
        ):
            raise ConfigError(
                f"ClusterTriplet(motion_channels={self.motion_channels}, motion_input="
                f"{self.motion_input!r}) but the data module gives {channels}-channel motion; "
                + ("motion_input='x3' needs flow or motion vectors (data.init_args.motion "
                   "'flow' or 'mv')" if self.motion_input == "x3" else
                   f"set model.init_args.motion_channels={channels}")
            )

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Run the base step, remembering ``batch_idx`` for the motion draws."""
        self._batch_idx = batch_idx
        return super().training_step(batch, batch_idx)

    def draw_motion_masks(self, batch_size: int, device: Any = None) -> Dict[int, torch.Tensor]:
        """Return ``{pos: bool B}`` per motion view: True (replaced) with ``motion_prob``.

        Independent per sample and per view, from a generator seeded by
        ``(torch.initial_seed(), epoch, batch index, rank)`` (see the class).
        """
        key = [torch.initial_seed(), self.current_epoch, self._batch_idx, self.global_rank]
        seed = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> np.uint64(1))
        gen = torch.Generator().manual_seed(seed)
        u = torch.rand(len(self.motion_views), batch_size, generator=gen)
        return {p: (u[i] < self.motion_prob).to(device) for i, p in enumerate(self.motion_views)}

    def _view_input(self, batch: Dict[str, Any], pos: int) -> torch.Tensor:
        clips = batch["views"][pos]
        mask = batch.get("motion_mask", {}).get(pos)
        if mask is None or self.motion_input != "x3":
            return clips
        stem = self.motion_stem
        assert stem is not None
        return clips.index_put((mask,), stem.x3(batch["motion"][pos][mask]).to(clips.dtype))

    def positive_view(self, batch: Dict[str, Any]) -> torch.Tensor:
        """Return the positive's encoder input ``B x C x T x H x W`` (view 1).

        The RGB clips, with the rows drawn in ``batch["motion_mask"][1]`` replaced by the
        positive's motion field in SLIC's ``"x3"`` format; with ``motion_input="xy"`` the RGB
        clips (the stem of those rows is swapped in the encoder). A subclass may return
        another modality here.
        """
        return self._view_input(batch, 1)

    def anchor_repeat_view(self, batch: Dict[str, Any]) -> torch.Tensor:
        """Return the re-augmented anchor's encoder input (view 2), as :meth:`positive_view`."""
        return self._view_input(batch, 2)

    def encode_motion(self, motion: torch.Tensor) -> torch.Tensor:
        """Return backbone features ``B x D`` of motion fields, in the ``motion_input`` format."""
        if self.motion_stem is None:
            raise NotImplementedError(
                "this ClusterTriplet was trained without motion (motion_prob=0) and "
                "motion_input='xy' has no stem then; evaluate it with features='rgb'"
            )
        return self.motion_stem.encode(self.backbone, motion)

    def _encode_clips(self, batch: Dict[str, Any], clips: list) -> torch.Tensor:
        """Backbone features of the stacked clips; the "xy" stem for the replaced rows."""
        x = torch.cat(clips, dim=0)
        masks = batch.get("motion_mask")
        if not masks or self.motion_input != "xy":
            return self.backbone(x)
        stem = self.motion_stem
        assert stem is not None
        b = clips[0].shape[0]
        rows = [torch.zeros(b, dtype=torch.bool, device=x.device)]
        rows += [masks[p].to(x.device) for p in range(1, len(clips))]
        motion = torch.cat([batch["motion"][p][masks[p]] for p in range(1, len(clips))])
        return stem(self.backbone, x, motion, torch.cat(rows))

    def compute_loss(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Triplet loss on pseudo-label pairs plus the temporal discrimination loss."""
        views = batch["views"]
        b = views[0].shape[0]
        extra: Dict[str, torch.Tensor] = {}
        if self.motion_views:
            masks = self.draw_motion_masks(b, views[0].device)
            batch["motion_mask"] = masks
            extra["motion_fraction"] = torch.stack(list(masks.values())).float().mean()
        clips = [views[0], self.positive_view(batch)]
        if self.temporal_weight > 0:
            clips.append(self.anchor_repeat_view(batch))
        z = self.projection(self._encode_clips(batch, clips))
        za, zp = z[:b], z[b : 2 * b]
        index = batch["index"]
        positive_index = batch.get("positive_index", index)
        labels = torch.cat(
            [
                labels_or_instances(self.pseudo_labels, index),
                labels_or_instances(self.pseudo_labels, positive_index),
            ]
        )
        sel = cluster_triplet_loss(z[: 2 * b], labels, self.margin)
        out = {
            "triplet_loss": sel.loss.detach(),
            "num_triplets": torch.tensor(float(sel.anchor.numel()), device=z.device),
            "same_video_rate": (positive_index == index).float().mean(),
            **sel.distances,
            **extra,
        }
        loss = sel.loss
        if self.temporal_weight > 0:
            temporal = temporal_discrimination_loss(za, z[2 * b :], zp, self.temporal_margin)
            out["temporal_loss"] = temporal.detach()
            loss = loss + self.temporal_weight * temporal
        out["loss"] = loss
        return out


ClusterTriplet.__doc__ = ClusterTriplet.__doc__.replace("{slic}", _SLIC)
