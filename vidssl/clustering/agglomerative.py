"""Agglomerative (hierarchical) clustering with scipy, guarded against running out of memory.

The seed's pseudo-label stage: average or ward linkage cut at a distance or a cluster count.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np

from vidssl.clustering.metrics import relabel_by_first_occurrence
from vidssl.clustering.neighbours import normalize_rows

log = logging.getLogger(__name__)

#: Linkages accepted by :func:`agglomerative` (scipy ``linkage`` methods).
LINKAGES = ("average", "ward", "complete", "single")


def available_memory_gb() -> Optional[float]:
    """Memory the kernel says is available (``MemAvailable`` of /proc/meminfo), or ``None``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def agglomerative_memory_gb(n: int) -> float:
    """Estimated peak memory of scipy's ``linkage`` on ``n`` points, in GiB.

    The condensed float64 distance matrix holds ``n (n - 1) / 2`` entries, and scipy's linkage
    works on a copy of it: about ``8 n (n - 1)`` bytes.
    """
    return 8.0 * n * (n - 1) / 2**30


def agglomerative(
    features: Any,
    num_clusters: Optional[int] = None,
    distance_threshold: Optional[float] = None,
    *,
    linkage: str = "average",
    metric: str = "cosine",
    max_memory_gb: Optional[float] = None,
) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Agglomerative clustering of ``N x D`` features, cut at a cluster count or a distance.

    Args:
        features: ``N x D`` array.
        num_clusters: cut the tree into this many clusters (exactly one of ``num_clusters`` and
            ``distance_threshold``).
        distance_threshold: cut the tree where merge distances exceed this value.
        linkage: ``"average"`` (default), ``"ward"``, ``"complete"`` or ``"single"``.
        metric: a scipy ``pdist`` metric, ``"cosine"`` by default. Ward needs Euclidean distances:
            with ``linkage="ward"`` and ``metric="cosine"`` the rows are L2-normalised and
            Euclidean distances used (``|u - v|^2 = 2 (1 - cos)`` for unit vectors).
        max_memory_gb: refuse to run when :func:`agglomerative_memory_gb` exceeds this; default
            80 % of the available memory. The check happens before anything is allocated.

    Returns:
        ``(labels, diagnostics)``: ``int64 N`` labels ``0 .. K-1`` numbered by first occurrence,
        and a dict with the linkage, the cut and the memory estimate.
    """
    from scipy.cluster.hierarchy import fcluster
    from scipy.cluster.hierarchy import linkage as scipy_linkage

    if linkage not in LINKAGES:
        raise ValueError(f"unknown linkage {linkage!r}; valid: {', '.join(LINKAGES)}")
    if (num_clusters is None) == (distance_threshold is None):
        raise ValueError("give exactly one of num_clusters and distance_threshold")
    x = np.asarray(features.detach().cpu() if hasattr(features, "detach") else features)
    x = np.ascontiguousarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must be a non-empty N x D array, got shape {x.shape}")
    n = len(x)
    need = agglomerative_memory_gb(n)
    if max_memory_gb is None:
        avail = available_memory_gb()
        max_memory_gb = None if avail is None else 0.8 * avail
    if max_memory_gb is not None and need > max_memory_gb:
        raise MemoryError(
            f"agglomerative clustering of {n} points needs about {need:.1f} GiB (an O(N^2) "
            f"distance matrix) but max_memory_gb is {max_memory_gb:.1f}; use method='finch' or "
            "'kmeans' for large banks, cluster a subset, or raise max_memory_gb"
        )
    if n == 1:
        return np.zeros(1, dtype=np.int64), {"linkage": linkage, "memory_gb": need}
    if linkage == "ward" and metric == "cosine":
        x, metric = normalize_rows(x), "euclidean"
    t0 = time.perf_counter()
    tree = scipy_linkage(x, method=linkage, metric=metric)
    if num_clusters is not None:
        if not 1 <= num_clusters <= n:
            raise ValueError(f"num_clusters must be in [1, {n}], got {num_clusters}")
        raw = fcluster(tree, t=num_clusters, criterion="maxclust")
    else:
        raw = fcluster(tree, t=distance_threshold, criterion="distance")
    labels = relabel_by_first_occurrence(raw)
    seconds = time.perf_counter() - t0
    log.info("agglomerative (%s): %d points -> %d clusters in %.2fs",
             linkage, n, int(labels.max()) + 1, seconds)
    return labels, {
        "linkage": linkage,
        "metric": metric,
        "num_clusters": num_clusters,
        "distance_threshold": distance_threshold,
        "memory_gb": need,
        "seconds": seconds,
    }
