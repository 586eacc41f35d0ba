"""Contrastive learning with pseudo-class positives and a hard slice of the other classes.

MoCo's momentum encoder and a key queue that remembers which video each key came from, so that
its pseudo-label is always the current one; agglomerative re-clustering by default.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np
import torch

from vidssl import distributed as vdist
from vidssl.losses.mining import (
    cluster_contrastive_loss,
    hard_negative_fn_rate,
    hard_negative_mask,
    labels_or_instances,
)
from vidssl.methods.base import UsesPseudoLabels
from vidssl.methods.moco import MoCo, MomentumKeys
from vidssl.methods.queue import KeyQueue
from vidssl.methods.settings import Head

__all__ = ["ClusterContrast"]

#: Valid values of ``ClusterContrast(positives=...)``.
POSITIVES = ("cluster", "sampled")


class ClusterContrast(UsesPseudoLabels, MomentumKeys):
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
      in the queue is not pulled in (how each setting fares: docs/benchmarks.md);
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
      on ``PseudoLabels`` for your data. Ward rather than average linkage, because average
      linkage of a young network's features can put most videos in one cluster. Cluster from
      pretrained features (``PseudoLabels(initial_weights=...)``, or a SimCLR stage first):
      the method is designed for the labels of a network that already separates videos, and
      from random weights its labels mostly group by appearance. Measurements of both
      choices: docs/benchmarks.md ("Retrieval after short pretraining").
      The documented path (``examples/configs/cluster_contrast_ucf101.yaml``) is therefore
      the proposal's source stage: ``PseudoLabels(initial_weights=<pre-trained backbone>,
      every_n_epochs=0)``, labels clustered once before training; these defaults apply when
      re-clustering.
    - ``hard_fraction=0.05``, ``drop_fraction=0.001``: Cai et al. 2020 (above).
    - ``temperature=0.2``, head (2-layer MLP, no BN), ``ema.momentum=0.999``, SGD ``lr=0.03``,
      momentum 0.9, weight decay 1e-4, cosine schedule: MoCo v2 (facebookresearch/moco)
      (``default_head``, ``default_ema``, ``default_optim``).
    - ``queue_size=4096``: smaller than MoCo's 65536 because a queue longer than a few epochs
      of a small dataset holds stale keys of the same videos; any size works (the queue wraps).

    Args:
        positives: ``"cluster"`` (every key of the query's pseudo-class) or ``"sampled"``
            (only the query's own positive key; the rest of its class is left out).
        hard_fraction: share of each query's negatives kept (the hardest), in ``(0, 1]``.
        drop_fraction: share of the very hardest negatives dropped first, in ``[0, 1)``.
        queue_size: keys kept from earlier batches; ``0`` for in-batch negatives only.
        temperature: softmax temperature.
        **kwargs: ``MomentumKeys``'s (``shuffle_bn``, ``bn_splits``) and ``VideoSSLMethod``'s
            (``backbone``, ``head``, ``optim``, ``ema``).
    """

    pseudo_label_defaults: Dict[str, Any] = {
        "method": "agglomerative",
        "every_n_epochs": 5,
        "start_epoch": 0,
        "features": "backbone",
        "cluster_fraction": 0.1,
        "clustering_kwargs": {"linkage": "ward"},
    }

    # Sources: the class docstring ("Defaults and sources"): MoCo v2's head (a 2-layer MLP
    # without BN, --mlp), optimiser and key momentum.
    default_head = Head(hidden_dim=None, output_dim=128, num_layers=2, batch_norm=False)
    default_optim = MoCo.default_optim
    default_ema = MoCo.default_ema

    def __init__(
        self,
        positives: str = "cluster",
        hard_fraction: float = 0.05,
        drop_fraction: float = 0.001,
        queue_size: int = 4096,
        temperature: float = 0.2,
        **kwargs: Any,
    ):
        if positives not in POSITIVES:
            raise ValueError(f"unknown positives={positives!r}; valid: {', '.join(POSITIVES)}")
        if not 0.0 < hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction must be in (0, 1], got {hard_fraction}")
        if not 0.0 <= drop_fraction < 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction}")
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        super().__init__(**kwargs)
        self.init_pseudo_labels()
        self.positives = positives
        self.hard_fraction = hard_fraction
        self.drop_fraction = drop_fraction
        self.temperature = temperature
        self.queue_size = queue_size
        # A ring: any queue size and batch work, so no size rule (whole_batches=False).
        self.key_queue = (KeyQueue(queue_size, self.head.output_dim, whole_batches=False)
                          if queue_size > 0 else None)

    def pseudo_label_diagnostics(
        self, features: np.ndarray, labels: np.ndarray, truth: np.ndarray
    ) -> Dict[str, float]:
        """Return the false-negative rate among the negatives this method keeps (the hardest).

        :func:`~vidssl.losses.mining.hard_negative_fn_rate` with this method's
        ``hard_fraction`` and ``drop_fraction``: a method that keeps only its hardest negatives
        is hurt by the false ones among them, which the rate over all negatives hides. Empty
        when no video has a known class. (The ``PseudoLabelDiagnostics`` hook.)
        """
        if not (np.asarray(truth) >= 0).any():
            return {}
        rate = hard_negative_fn_rate(features, labels, truth, self.hard_fraction,
                                     drop_fraction=self.drop_fraction)
        return {} if rate is None else {"hard_negative_fn_rate": rate}

    def compute_loss(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Pseudo-class positives against the hardest other-class keys (batch + queue)."""
        index = batch["index"]
        positive_index = batch.get("positive_index", index)
        q = self._queries(batch["views"][0])
        k = self._keys(batch["views"][1])
        keys_batch = vdist.all_gather(k)
        index_batch = vdist.all_gather(positive_index.long())
        if self.key_queue is not None:
            # The queue as it was before this batch goes in (as MoCo), written slots only.
            queued, queued_index = self.key_queue.snapshot(filled_only=True)
            keys = torch.cat([keys_batch, queued])
            key_index = torch.cat([index_batch, queued_index])
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
        self.enqueue(keys_batch, index_batch, gathered=True)
        return {
            "loss": loss,
            "positives_per_query": positive.float().sum(1).mean(),
            "negatives_per_query": negative.float().sum(1).mean(),
        }
