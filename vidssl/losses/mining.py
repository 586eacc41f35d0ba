"""Pseudo-label-aware positive/negative mining and the losses of the cluster-guided methods.

Plain functions on embeddings and labels (no module state), shared by ``ClusterTriplet`` (SLIC)
and ``ClusterContrast``; each is checked in ``tests/test_mining.py`` against direct loops.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from vidssl.losses.triplet import triplet_margin_cosine

__all__ = [
    "TripletSelection",
    "check_negative_fractions",
    "cluster_contrastive_loss",
    "cluster_triplet_loss",
    "hard_negative_fn_rate",
    "hard_negative_mask",
    "label_distances",
    "labels_or_instances",
    "pairwise_cosine_distance",
    "select_semi_hard_negatives",
    "temporal_discrimination_loss",
]


def pairwise_cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise ``1 - cos(x_i, y_j)``: ``(P x D, M x D) -> P x M``, SLIC's distance ``d``.

    (``vidssl.losses.cosine_distance`` is the row-by-row version.)
    """
    return 1.0 - F.normalize(x, dim=1) @ F.normalize(y, dim=1).t()


def labels_or_instances(pseudo_labels: Optional[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """Pseudo-labels of the videos ``index``; a video without one is its own class.

    A missing label (no labels yet, or ``-1``) becomes ``-2 - index``: negative, so it never equals
    a cluster id, and shared only by clips of the same video. Clips of one video are then
    positives of each other and negatives of everything else (instance discrimination).

    Args:
        pseudo_labels: ``LongTensor N`` or ``None``.
        index: ``LongTensor B`` dataset indices.

    Returns:
        ``LongTensor B`` on ``index``'s device.
    """
    index = index.long()
    instance = -2 - index
    if pseudo_labels is None:
        return instance
    lab = pseudo_labels.to(index.device)[index]
    return torch.where(lab >= 0, lab, instance)


def select_semi_hard_negatives(
    dist: torch.Tensor,
    dist_ap: torch.Tensor,
    negative_mask: torch.Tensor,
    margin: float,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """SLIC's ``random_semi_hard`` negative for each anchor-positive pair.

    Candidates are the allowed negatives ``n`` with ``d(a, n) < d(a, p) + margin`` (semi-hard and
    hard); one is drawn uniformly. When there is none, the closest allowed negative is taken
    (``hardest_easy_sampling``). Source: ``random_semi_hard_sampling`` and
    ``get_one_one_triplets`` in ``loss/triplet_loss.py`` of
    github.com/rvl-lab-utoronto/video_similarity_search.

    Args:
        dist: ``P x M`` anchor-to-candidate distances ``d(a, n)``.
        dist_ap: ``P`` anchor-positive distances ``d(a, p)``.
        negative_mask: ``P x M`` bool, which candidates may be negatives of each pair.
        margin: the triplet margin ``m1``.
        generator: random generator for the uniform draw.

    Returns:
        ``LongTensor P``: the chosen column, ``-1`` where a pair has no allowed negative.
    """
    with torch.no_grad():
        semi = negative_mask & (dist < dist_ap[:, None] + margin)
        noise_device = generator.device if generator is not None else dist.device
        noise = torch.rand(dist.shape, generator=generator, device=noise_device).to(dist.device)
        # The largest uniform score among candidates is a uniform choice among them.
        random_pick = torch.where(semi, noise, torch.full_like(noise, -1.0)).argmax(dim=1)
        closest = torch.where(negative_mask, dist, torch.full_like(dist, float("inf"))).argmin(1)
        chosen = torch.where(semi.any(dim=1), random_pick, closest)
        return torch.where(negative_mask.any(dim=1), chosen, torch.full_like(chosen, -1))


class TripletSelection(NamedTuple):
    """Result of :func:`cluster_triplet_loss`: the loss and the triplets it used.

    ``anchor``, ``positive``, ``negative`` are ``LongTensor T`` rows of the embedding matrix;
    ``distances`` is :func:`label_distances` of the embeddings, from the distances the
    selection computed anyway.
    """

    loss: torch.Tensor
    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    distances: Dict[str, torch.Tensor]


def cluster_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.2,
    generator: Optional[torch.Generator] = None,
) -> TripletSelection:
    """SLIC's instance triplet loss with cluster-aware semi-hard negatives.

    As in SLIC's ``OnlineTripletLoss`` (``loss/triplet_loss.py`` of
    github.com/rvl-lab-utoronto/video_similarity_search), ``embeddings`` are the anchors and the
    positives of a batch stacked (``2B x D``) with their labels, every pair ``i < j`` with the same
    label is an anchor-positive pair, and each pair gets one negative among the rows of another
    label by :func:`select_semi_hard_negatives`. Loss: the mean over triplets of
    ``relu(d(a, p) - d(a, n) + margin)`` with ``d = 1 - cos``; zero (with a gradient path) when
    there is no triplet.

    Args:
        embeddings: ``R x D`` (not necessarily normalised).
        labels: ``LongTensor R`` (pseudo-labels; see :func:`labels_or_instances`).
        margin: ``m1``; 0.2 is SLIC's ``LOSS.MARGIN``.
        generator: random generator for the negative draw.

    Returns:
        A :class:`TripletSelection`.
    """
    with torch.no_grad():  # the selection only; the loss recomputes d with its gradient
        dist = pairwise_cosine_distance(embeddings, embeddings)
    same = labels[:, None] == labels[None, :]
    anchor, positive = torch.triu(same, diagonal=1).nonzero(as_tuple=True)
    negative = select_semi_hard_negatives(
        dist[anchor], dist[anchor, positive], ~same[anchor], margin, generator
    )
    keep = negative >= 0
    anchor, positive, negative = anchor[keep], positive[keep], negative[keep]
    distances = _mean_distances(dist, same)
    if anchor.numel() == 0:
        return TripletSelection(embeddings.sum() * 0.0, anchor, positive, negative, distances)
    # index_select, not e[anchor]: the backward of advanced indexing accumulates a row that
    # appears in many triplets with parallel atomic adds on a multi-threaded CPU (when the
    # triplets hold >= 32768 numbers), so the same seed gave different weights run to run;
    # index_select's backward (index_add) sums in index order.
    rows = [embeddings.index_select(0, i) for i in (anchor, positive, negative)]
    loss = triplet_margin_cosine(*rows, margin)
    return TripletSelection(loss, anchor, positive, negative, distances)


def label_distances(embeddings: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Mean cosine distance ``d = 1 - cos`` between rows of the same and of other labels.

    A training diagnostic for the metric-learning losses, computed without gradient:
    ``dist_same`` averages ``d`` over the pairs ``i != j`` with ``labels[i] == labels[j]``,
    ``dist_other`` over the pairs with different labels (``NaN`` when there is no such pair).
    A loss that separates the pseudo-classes makes ``dist_other`` grow above ``dist_same``;
    both near 0 means that every embedding points the same way (a collapsed embedding, where
    a triplet loss sits at its margin).

    Args:
        embeddings: ``R x D`` (not necessarily normalised).
        labels: ``LongTensor R``.

    Returns:
        ``{"dist_same": 0-dim tensor, "dist_other": 0-dim tensor}``.
    """
    with torch.no_grad():
        dist = pairwise_cosine_distance(embeddings, embeddings)
    return _mean_distances(dist, labels[:, None] == labels[None, :])


def _mean_distances(dist: torch.Tensor, same: torch.Tensor) -> Dict[str, torch.Tensor]:
    """:func:`label_distances` from the ``R x R`` distances and same-label mask."""
    off_diagonal = ~torch.eye(len(same), dtype=torch.bool, device=dist.device)

    def mean(mask: torch.Tensor) -> torch.Tensor:  # 0 / 0 = NaN for an empty mask
        return (dist * mask).sum() / mask.sum()

    return {"dist_same": mean(same & off_diagonal), "dist_other": mean(~same)}


def temporal_discrimination_loss(
    anchor: torch.Tensor,
    anchor_again: torch.Tensor,
    positive: torch.Tensor,
    margin: float = 0.04,
) -> torch.Tensor:
    """SLIC's temporal discrimination loss ``mean relu(d(a, a') - d(a, p) + m2)``.

    ``a'`` is the anchor clip augmented a second time: it must stay closer to ``a`` than the
    positive ``p`` (another clip or video) does. SLIC computes it with
    ``MarginRankingLoss(margin=LOSS.LOCAL_LOCAL_MARGIN = 0.04)`` on ``(d(a, a'), d(a, p), -1)`` in
    ``online_train.py`` of github.com/rvl-lab-utoronto/video_similarity_search.

    Args:
        anchor: ``B x D`` embeddings of the anchor clips.
        anchor_again: ``B x D`` embeddings of the re-augmented anchor clips.
        positive: ``B x D`` embeddings of the positives.
        margin: ``m2``.
    """
    # The same hinge as a triplet with a' in the positive's place and p in the negative's.
    return triplet_margin_cosine(anchor, anchor_again, positive, margin)


def check_negative_fractions(keep_fraction: float, drop_fraction: float) -> None:
    """Raise ``ValueError`` unless ``0 < keep_fraction <= 1`` and ``0 <= drop_fraction < 1``."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}.")
    if not 0.0 <= drop_fraction < 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction}.")


def hard_negative_mask(
    similarity: torch.Tensor,
    negative_mask: torch.Tensor,
    keep_fraction: float = 0.05,
    drop_fraction: float = 0.001,
) -> torch.Tensor:
    """Keep per row the hardest ``keep_fraction`` of its negatives, after the very hardest.

    After Cai et al. 2020, "Are all negatives created equal in contrastive instance
    discrimination?" (arXiv:2010.06682): the hardest 5 % of negatives are necessary and
    sufficient, the very hardest 0.1 % unnecessary and sometimes harmful (they are mostly the
    query's own class). With ``n`` negatives in a row (most similar first), the
    ``floor(drop_fraction * n)`` hardest are dropped and the next ``ceil(keep_fraction * n)`` kept.

    Args:
        similarity: ``B x K`` query-key similarities (higher is harder).
        negative_mask: ``B x K`` bool, the negatives of each query.
        keep_fraction: fraction of negatives kept, in ``(0, 1]``.
        drop_fraction: fraction of the hardest negatives dropped first, in ``[0, 1)``.

    Returns:
        ``B x K`` bool mask of the kept negatives.
    """
    check_negative_fractions(keep_fraction, drop_fraction)
    with torch.no_grad():
        n = negative_mask.sum(dim=1, keepdim=True)
        drop = torch.floor(n * drop_fraction).long()
        keep = torch.ceil(n * keep_fraction).long()
        score = torch.where(negative_mask, similarity, torch.full_like(similarity, -float("inf")))
        # A stable sort: equal similarities rank by column, so the kept set is reproducible.
        order = score.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        return negative_mask & (rank >= drop) & (rank < drop + keep)


def cluster_contrastive_loss(
    query: torch.Tensor,
    keys: torch.Tensor,
    positive_mask: torch.Tensor,
    negative_mask: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Contrastive loss with several positives per query and a chosen set of negatives.

    For query ``i`` and each of its positives ``p``::

        l_ip = -log( exp(s_ip / t) / (exp(s_ip / t) + sum_{n in N_i} exp(s_in / t)) )

    with ``s`` the cosine similarity and ``N_i`` the negatives of ``negative_mask`` (e.g. those
    kept by :func:`hard_negative_mask`). Each positive competes only with the negatives, not with
    the other positives of its class. The loss averages ``l_ip`` over each query's positives, then
    over queries that have at least one positive (zero with a gradient path when none has).

    Args:
        query: ``B x D`` query embeddings.
        keys: ``K x D`` key embeddings.
        positive_mask: ``B x K`` bool.
        negative_mask: ``B x K`` bool (disjoint from ``positive_mask``).
        temperature: ``t``.
    """
    logits = (F.normalize(query, dim=1) @ F.normalize(keys, dim=1).t()) / temperature
    neg = torch.where(negative_mask, logits, torch.full_like(logits, -float("inf")))
    lse_neg = torch.logsumexp(neg, dim=1, keepdim=True)  # -inf where a query has no negative
    per_pair = torch.logaddexp(logits, lse_neg) - logits
    pos = positive_mask.to(logits.dtype)
    n_pos = pos.sum(dim=1)
    has = n_pos > 0
    if not bool(has.any()):
        return logits.sum() * 0.0
    per_query = (torch.where(positive_mask, per_pair, torch.zeros_like(per_pair))).sum(1)
    return (per_query[has] / n_pos[has]).mean()


def hard_negative_fn_rate(
    features: Any,
    pseudo: Any,
    truth: Any,
    fraction: float,
    *,
    drop_fraction: float = 0.0,
    max_anchors: int = 512,
    chunk_size: int = 256,
    seed: int = 0,
) -> Optional[float]:
    """How often the *hardest* negatives outside an anchor's cluster share its class.

    For each anchor ``a`` with a known class (at most ``max_anchors``, drawn with ``seed``), the
    videos outside ``a``'s cluster are ranked by cosine similarity to ``a``, the most similar
    ``floor(drop_fraction * n)`` of its ``n`` are skipped and the next ``ceil(fraction * n)``
    kept, as ``hard_negative_mask`` keeps them for ``ClusterContrast``. The rate is the mean
    share of kept negatives with ``a``'s class. Over a class split into several clusters, the
    hardest negatives are its sibling clusters: this rate can be far above
    :func:`pair_error_rates`' ``negative_fn_rate``, which counts all negatives. (The method
    ranks its keys by projection similarity; this ranks the bank's features, the ones
    clustered.)

    Args:
        features: ``N x D`` bank features.
        pseudo: ``N`` cluster labels.
        truth: ``N`` class labels, ``-1`` where unknown (left out, as anchors and negatives).
        fraction: share of each anchor's negatives kept, in ``(0, 1]``.
        drop_fraction: share of the very hardest skipped first, in ``[0, 1)``.
        max_anchors: anchors scored (a random subset above this; 512 gives the rate to about
            +-0.02), bounding the cost to ``max_anchors x N`` similarities and their top
            ``fraction`` (about 12 s at N = 240k on 2 CPU cores).
        chunk_size: at most this many anchors per matrix product, fewer on a large bank so
            that a chunk's similarities stay near 2^23 entries.
        seed: seed of the anchor subset.

    Returns:
        The rate, or ``None`` when no anchor has a known class and a negative.
    """
    check_negative_fractions(fraction, drop_fraction)
    t = torch.as_tensor(np.asarray(truth)).reshape(-1).long()
    known = t >= 0
    x = F.normalize(torch.as_tensor(np.asarray(features)).float()[known], dim=1)
    p = torch.as_tensor(np.asarray(pseudo)).reshape(-1).long()[known]
    t = t[known]
    n = t.numel()
    anchors = torch.arange(n)
    if n > max_anchors:
        g = torch.Generator().manual_seed(seed)
        anchors = torch.randperm(n, generator=g)[:max_anchors].sort().values
    rates = []
    step = max(1, min(chunk_size, 2**23 // max(n, 1)))
    for lo in range(0, anchors.numel(), step):
        a = anchors[lo : lo + step]
        outside = p[a][:, None] != p[None, :]
        kept = hard_negative_mask(x[a] @ x.T, outside, fraction, drop_fraction)
        same = t[a][:, None] == t[None, :]
        count = kept.sum(1)
        ok = count > 0
        rates.append((kept & same).sum(1)[ok] / count[ok])
    rates_t = torch.cat(rates) if rates else torch.empty(0)
    return float(rates_t.mean()) if rates_t.numel() else None
