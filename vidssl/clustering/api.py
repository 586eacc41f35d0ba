"""One entry point, :func:`cluster`, for every clustering method and its diagnostics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from vidssl.clustering.agglomerative import agglomerative
from vidssl.clustering.finch import finch
from vidssl.clustering.kmeans import kmeans
from vidssl.clustering.metrics import clustering_metrics

#: Valid values of ``cluster(method=...)``.
METHODS = ("finch", "agglomerative", "kmeans")


@dataclass
class ClusteringResult:
    """The outcome of :func:`cluster`.

    Attributes:
        labels: ``int64 N`` labels of the chosen partition, ``0 .. K-1``.
        levels: ``int64 N x L`` all FINCH levels (finest first); ``None`` for other methods.
        num_clusters: cluster count of every level (one entry for non-hierarchical methods).
        diagnostics: method settings and timings, :func:`cluster_stats` of ``labels``, and
            NMI/AMI/ARI when ground truth was given. Plain Python numbers, safe to checkpoint.
    """

    labels: np.ndarray
    levels: Optional[np.ndarray] = None
    num_clusters: List[int] = field(default_factory=list)
    diagnostics: Dict[str, Any] = field(default_factory=dict)


def cluster(
    features: Any,
    method: str = "finch",
    *,
    truth: Optional[Any] = None,
    level: int = 0,
    **kwargs: Any,
) -> ClusteringResult:
    """Cluster ``N x D`` features with one of :data:`METHODS`.

    Args:
        features: ``N x D`` numpy array or torch tensor.
        method: ``"finch"`` (default; parameter-free), ``"agglomerative"`` or ``"kmeans"``.
        truth: optional ground-truth labels (``-1`` = unknown) to score the result against.
        level: FINCH only: which level's labels to return (``0`` finest, ``-1`` coarsest);
            ignored when ``req_clust`` is given, whose partition is returned instead.
        **kwargs: passed on to :func:`~vidssl.clustering.finch`,
            :func:`~vidssl.clustering.agglomerative` (``num_clusters`` or
            ``distance_threshold``, ``linkage``, ``max_memory_gb``) or
            :func:`~vidssl.clustering.kmeans` (``num_clusters``).

    Returns:
        A :class:`ClusteringResult`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown clustering method {method!r}; valid: {', '.join(METHODS)}")
    levels = None
    if method == "finch":
        res = finch(features, **kwargs)
        levels, nums = res.partitions, list(res.num_clusters)
        if res.requested is not None:
            labels = res.requested
        else:
            if not -len(nums) <= level < len(nums):
                raise ValueError(f"level={level} but FINCH found {len(nums)} levels: {nums}")
            labels = levels[:, level]
        diagnostics = dict(res.diagnostics)
    else:
        fn = agglomerative if method == "agglomerative" else kmeans
        labels, diagnostics = fn(features, **kwargs)
        nums = [int(labels.max()) + 1]
    diagnostics = {"method": method, **diagnostics}
    diagnostics.update(clustering_metrics(labels, truth))
    return ClusteringResult(np.asarray(labels, dtype=np.int64), levels, nums, diagnostics)
