"""Contrastive learning with pseudo-class positives and a hard slice of the other classes.

MoCo's momentum encoder and queue, where the queue remembers which video each key came from so
that its pseudo-label is always the current one; agglomerative re-clustering by default.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from vidssl import distributed as vdist
from vidssl.losses.mining import cluster_contrastive_loss, hard_negative_mask, labels_or_instances
from vidssl.methods.moco import MoCo

__all__ = ["ClusterContrast"]

#: Valid values of ``ClusterContrast(positives=...)``.
POSITIVES = ("cluster", "sampled")


class ClusterContrast(MoCo):
    """Contrastive learning whose positives are the anchor's pseudo-class (cluster-guided).

    Queries are the online projections of view 0 (the anchor). Keys come from the momentum
    encoder (MoCo v2's, with shuffle-BN; see ``MoCo``): the keys of view 1 of the whole global batch
    (view 1 is the sampler's positive: another clip of the anchor, or another video of its
    cluster) followed by a queue of ``queue_size`` earlier keys. The queue stores each key's
    dataset index, so its pseudo-labels are read from the current labels and change with every
    re-clustering. For query ``i`` (``vidssl.losses.mining``):

    - positives (``positives="cluster"``, the default): every key with ``i``'s pseudo-label
      (including its own positive key). With ``positives="sampled"`` only ``i``'s own positive
      key (view 1 of its row: the sampler's other clip or cluster-mate) is a positive; the other
      keys of ``i``'s pseudo-class are neither positives nor negatives, so a false cluster-mate
      in the queue is not pulled in. On the synthetic benchmark, after a SimCLR start with
      FINCH labels, ``"sampled"`` made the labels purer in 5 of 5 seeds (the default: NMI rose
      in 3 of 5) for the same R@1 within a query (mean 0.914 against 0.922; docs/benchmarks.md);
    - negatives: the keys of other pseudo-labels, of which only the hardest ``hard_fraction``
      (default 5 %) are kept after dropping the hardest ``drop_fraction`` (0.1 %), following
      Cai et al. 2020, "Are all negatives created equal in contrastive instance
      discrimination?" (arXiv:2010.06682): the hardest 5 % are necessary and sufficient, the
      hardest 0.1 % unnecessary, sometimes harmful, and mostly same-class (false negatives
      missed by the clustering);
    - loss: ``cluster_contrastive_loss``, each positive against the kept negatives.

    Negative source: the queue plus the global batch's keys (``queue_size=0``: the batch's keys
    only, i.e. in-batch negatives of every rank). Fractions are taken of the negatives available
    to each query, so a small pool keeps at least one negative and drops none. Without
    pseudo-labels (before the first clustering) every video is its own class: MoCo with hard
    negatives.

    Defaults and sources:

    - pseudo-labels (``pseudo_label_defaults``): agglomerative clustering (ward linkage on the
      L2-normalised features, i.e. cosine) of the backbone features into ``N / 10`` clusters,
      every 5 epochs from epoch 0. Over-clustering keeps clusters pure (a false positive costs
      more than a missed one: the hard-negative filter already spares near neighbours).
      ``N / 10`` and ward are choices of this library, not published values: set
      ``num_clusters``, ``cluster_fraction``, ``distance_threshold`` or ``clustering_kwargs``
      on ``PseudoLabels`` for your data. Ward rather than average linkage: on the synthetic
      collection average linkage of a young network's features made one giant cluster (up to
      121 of 168 videos) whose labels got worse over training, while ward's clusters stayed
      balanced and got purer in 3 of 3 seeds; R@1 differed within noise
      (docs/benchmarks.md, 2026-12-01). On that collection the method beat its random start
      reliably only from pretrained features (the seed's "pseudo-labels from a pre-trained
      network": ``PseudoLabels(initial_weights=...)``, or a SimCLR stage first) with FINCH's
      finest partition (``PseudoLabels(method="finch")``): 5 of 5 seeds, against 1 of 3 with
      these labels; from random weights, in 1 of the first 3 seeds whatever the labels
      (3 of 5 with these, its mean no better than the start's). The documented path
      (``examples/configs/cluster_contrast_ucf101.yaml``) is therefore the proposal's source
      stage: ``PseudoLabels(initial_weights=<pre-trained backbone>, every_n_epochs=0)``,
      labels clustered once before training; these defaults apply when re-clustering.
    - ``hard_fraction=0.05``, ``drop_fraction=0.001``: Cai et al. 2020 (above).
    - ``temperature=0.2``, head (2-layer MLP, no BN), ``ema_momentum=0.999``, SGD ``lr=0.03``,
      momentum 0.9, weight decay 1e-4, cosine schedule: MoCo v2 (facebookresearch/moco).
    - ``queue_size=4096``: smaller than MoCo's 65536 because a queue longer than a few epochs
      of a small dataset holds stale keys of the same videos; any size works (the queue wraps).

    Args:
        positives: ``"cluster"`` (every key of the query's pseudo-class) or ``"sampled"``
            (only the query's own positive key; the rest of its class is left out).
        hard_fraction: share of each query's negatives kept (the hardest), in ``(0, 1]``.
        drop_fraction: share of the very hardest negatives dropped first, in ``[0, 1)``.
        queue_size: keys kept from earlier batches; ``0`` for in-batch negatives only.
        temperature: softmax temperature.
        backbone, ...: as ``MoCo`` / ``VideoSSLMethod``.
    """

    pseudo_label_defaults: Dict[str, Any] = {
        "method": "agglomerative",
        "every_n_epochs": 5,
        "start_epoch": 0,
        "features": "backbone",
        "cluster_fraction": 0.1,
        "clustering_kwargs": {"linkage": "ward"},
    }

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "r3d_18",
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        weights: Optional[str] = None,
        positives: str = "cluster",
        hard_fraction: float = 0.05,
        drop_fraction: float = 0.001,
        queue_size: int = 4096,
        temperature: float = 0.2,
        shuffle_bn: bool = True,
        bn_splits: int = 2,
        ema_momentum: float = 0.999,
        proj_hidden_dim: Optional[int] = None,
        proj_output_dim: int = 128,
        optimizer: str = "sgd",
        lr: float = 0.03,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        warmup_epochs: float = 0.0,
        lr_schedule: str = "cosine",
        min_lr_ratio: float = 0.0,
    ):
        if positives not in POSITIVES:
            raise ValueError(f"unknown positives={positives!r}; valid: {', '.join(POSITIVES)}")
        if not 0.0 < hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction must be in (0, 1], got {hard_fraction}")
        if not 0.0 <= drop_fraction < 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction}")
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        super().__init__(
            backbone=backbone,
            backbone_kwargs=backbone_kwargs,
            weights=weights,
            version=2,
            temperature=temperature,
            queue_size=max(queue_size, 1),  # MoCo needs a positive size; 0 is handled here
            shuffle_bn=shuffle_bn,
            bn_splits=bn_splits,
            ema_momentum=ema_momentum,
            # Own-video keys are never negatives here: same label (the video's or its cluster's).
            mask_own_video=True,
            proj_hidden_dim=proj_hidden_dim,
            proj_output_dim=proj_output_dim,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            warmup_epochs=warmup_epochs,
            lr_schedule=lr_schedule,
            min_lr_ratio=min_lr_ratio,
        )
        self.positives = positives
        self.hard_fraction = hard_fraction
        self.drop_fraction = drop_fraction
        self.queue_size = queue_size  # MoCo's buffers hold max(queue_size, 1) keys and indices

    def check_queue(
        self, batch_size: int, drop_last: Optional[bool], world_size: int = 1
    ) -> None:
        """Accept any queue size and short batches: this queue is a ring buffer."""

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, index: torch.Tensor) -> None:  # type: ignore[override]
        """Write the global batch's keys and their dataset indices into the ring buffer."""
        if self.queue_size > 0:
            self._write_queue(keys, index)

    def compute_loss(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Pseudo-class positives against the hardest other-class keys (batch + queue)."""
        index = batch["index"]
        positive_index = batch.get("positive_index", index)
        q = self._queries(batch["views"][0])
        k = self._keys(batch["views"][1])
        keys_batch = vdist.all_gather(k)
        index_batch = vdist.all_gather(positive_index.long())
        if self.queue_size > 0:
            # The queue as it was before this batch goes in (as MoCo).
            valid = self.queue_index >= 0
            keys = torch.cat([keys_batch, self.queue[valid].clone()])
            key_index = torch.cat([index_batch, self.queue_index[valid]])
        else:
            keys, key_index = keys_batch, index_batch
        q_labels = labels_or_instances(self.pseudo_labels, index)
        k_labels = labels_or_instances(self.pseudo_labels, key_index)
        same_class = q_labels[:, None] == k_labels[None, :]
        positive = same_class
        if self.positives == "sampled":
            # Row i's own positive key is row (rank * B + i) of the gathered batch keys.
            rows = torch.arange(q.shape[0], device=q.device)
            positive = torch.zeros_like(same_class)
            positive[rows, vdist.get_rank() * q.shape[0] + rows] = True
        with torch.no_grad():
            sim = torch.nn.functional.normalize(q, dim=1) @ keys.t()
        # Never a negative: the query's class, and its own positive key even if the labels
        # changed after the sampler drew it.
        candidates = ~(same_class | positive)
        negative = hard_negative_mask(sim, candidates, self.hard_fraction, self.drop_fraction)
        loss = cluster_contrastive_loss(q, keys, positive, negative, self.temperature)
        self.enqueue(keys_batch, index_batch)
        return {
            "loss": loss,
            "positives_per_query": positive.float().sum(1).mean(),
            "negatives_per_query": negative.float().sum(1).mean(),
        }
