"""k-means with faiss: a fast, fixed-K alternative to FINCH for pseudo-labels."""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Tuple

import numpy as np

from vidssl.clustering.neighbours import normalize_rows

log = logging.getLogger(__name__)


def kmeans(
    features: Any,
    num_clusters: int,
    *,
    niter: int = 25,
    nredo: int = 1,
    spherical: bool = True,
    seed: int = 1234,
    max_points_per_centroid: int = 256,
) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Cluster ``N x D`` features into ``num_clusters`` with ``faiss.Kmeans``.

    Args:
        features: ``N x D`` array.
        num_clusters: K, ``1 <= K <= N``.
        niter: Lloyd iterations (faiss's default 25).
        nredo: restarts; the best objective is kept (faiss's default 1).
        spherical: L2-normalise the rows and the centroids (cosine k-means, as the FINCH and
            retrieval paths use cosine); ``False`` for plain Euclidean k-means.
        seed: faiss's random seed (its default 1234), so results are reproducible.
        max_points_per_centroid: faiss trains on a sample of at most this many points per
            centroid (its default 256); the labels are then assigned for every point.

    Returns:
        ``(labels, diagnostics)``: ``int64 N`` labels and a dict with the final objective.
    """
    import faiss

    x = np.asarray(features.detach().cpu() if hasattr(features, "detach") else features)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must be a non-empty N x D array, got shape {x.shape}")
    if not 1 <= num_clusters <= len(x):
        raise ValueError(f"num_clusters must be in [1, {len(x)}], got {num_clusters}")
    if spherical:
        x = normalize_rows(x)
    t0 = time.perf_counter()
    km = faiss.Kmeans(
        x.shape[1],
        int(num_clusters),
        niter=niter,
        nredo=nredo,
        spherical=spherical,
        seed=seed,
        max_points_per_centroid=max_points_per_centroid,
        verbose=False,
    )
    km.train(x)
    _, assign = km.index.search(x, 1)
    seconds = time.perf_counter() - t0
    log.info("k-means: %d points -> %d clusters in %.2fs", len(x), num_clusters, seconds)
    objective = float(km.obj[-1]) if len(km.obj) else float("nan")
    return assign.ravel().astype(np.int64), {"objective": objective, "seconds": seconds}
