"""Clustering of feature banks: FINCH, agglomerative, k-means, and cluster-quality metrics.

Callers use :func:`cluster`; :func:`finch` exposes every FINCH level and its options.
"""

from vidssl.clustering.agglomerative import agglomerative, agglomerative_memory_gb
from vidssl.clustering.api import METHODS, ClusteringResult, cluster
from vidssl.clustering.finch import FinchResult, finch, merge_to_count
from vidssl.clustering.kmeans import kmeans
from vidssl.clustering.metrics import (
    adjusted_mutual_info,
    adjusted_rand_index,
    cluster_stats,
    clustering_metrics,
    homogeneity,
    normalized_mutual_info,
    pair_error_rates,
)
from vidssl.clustering.neighbours import first_neighbour_recall, first_neighbours

__all__ = [
    "METHODS",
    "ClusteringResult",
    "FinchResult",
    "adjusted_mutual_info",
    "adjusted_rand_index",
    "agglomerative",
    "agglomerative_memory_gb",
    "cluster",
    "cluster_stats",
    "clustering_metrics",
    "finch",
    "first_neighbour_recall",
    "first_neighbours",
    "homogeneity",
    "kmeans",
    "merge_to_count",
    "normalized_mutual_info",
    "pair_error_rates",
]
