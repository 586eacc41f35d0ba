"""Losses of the self-supervised methods, as plain functions usable on their own."""

from vidssl.losses.contrastive import info_nce, nt_xent
from vidssl.losses.triplet import cosine_distance, triplet_margin_cosine

__all__ = ["cosine_distance", "info_nce", "nt_xent", "triplet_margin_cosine"]

from vidssl.losses.mining import (  # noqa: E402
    cluster_contrastive_loss,
    cluster_triplet_loss,
    hard_negative_mask,
    labels_or_instances,
    pairwise_cosine_distance,
    select_semi_hard_negatives,
    temporal_discrimination_loss,
)

__all__ += [
    "cluster_contrastive_loss",
    "cluster_triplet_loss",
    "hard_negative_mask",
    "labels_or_instances",
    "pairwise_cosine_distance",
    "select_semi_hard_negatives",
    "temporal_discrimination_loss",
]
