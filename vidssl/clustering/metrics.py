"""Cluster-quality metrics: agreement with ground truth (NMI, AMI, ARI) and cluster-size statistics.

ARI and NMI are computed here in float64 from a sparse contingency table (torchmetrics'
``adjusted_rand_score`` overflowed int64 pair counts at N = 250k); AMI comes from scikit-learn.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np


def relabel_by_first_occurrence(labels: Any) -> np.ndarray:
    """Renumber cluster ids ``0 .. K-1`` in the order each first appears: ``int64 N``.

    Labels then do not depend on how a clustering method happened to number its clusters.
    """
    _, first, inverse = np.unique(np.asarray(labels), return_index=True, return_inverse=True)
    order = np.empty(len(first), dtype=np.int64)
    order[np.argsort(first)] = np.arange(len(first))
    return order[inverse.ravel()]


def _as_labels(labels: Any, name: str) -> np.ndarray:
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of labels, got shape {arr.shape}")
    return arr


def _contingency(a: np.ndarray, b: np.ndarray):
    """Sparse contingency table of ``a`` and ``b``, all float64 counts.

    Returns the non-zero cells ``n_ij``, the true-class and predicted-cluster sizes of each
    cell (``a_i``, ``b_j``), and both marginals (all class sizes, all cluster sizes).
    """
    if len(a) != len(b):
        raise ValueError(f"label arrays differ in length: {len(a)} and {len(b)}")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    ia, ib = ia.ravel().astype(np.int64), ib.ravel().astype(np.int64)
    rows, cols = np.bincount(ia).astype(np.float64), np.bincount(ib).astype(np.float64)
    codes, cells = np.unique(ia * len(cols) + ib, return_counts=True)
    return cells.astype(np.float64), rows[codes // len(cols)], cols[codes % len(cols)], rows, cols


def adjusted_rand_index(labels_true: Any, labels_pred: Any) -> float:
    """Compute the adjusted Rand index (Hubert & Arabie 1985) with pair counts in float64.

    ``ARI = (sum_ij C(n_ij, 2) - E) / (0.5 (sum_i C(a_i, 2) + sum_j C(b_j, 2)) - E)`` with
    ``E = sum_i C(a_i, 2) sum_j C(b_j, 2) / C(N, 2)``. Like scikit-learn, identical trivial
    partitions (one cluster each, or all singletons) score 1.0.
    """
    a, b = _as_labels(labels_true, "labels_true"), _as_labels(labels_pred, "labels_pred")
    n = float(len(a))
    if n < 2:
        return 1.0
    cells, _, _, rows, cols = _contingency(a, b)
    index = np.sum(cells * (cells - 1.0)) / 2.0
    sum_a = np.sum(rows * (rows - 1.0)) / 2.0
    sum_b = np.sum(cols * (cols - 1.0)) / 2.0
    expected = sum_a * sum_b / (n * (n - 1.0) / 2.0)
    maximum = 0.5 * (sum_a + sum_b)
    if maximum == expected:
        return 1.0
    return float((index - expected) / (maximum - expected))


def _entropy(counts: np.ndarray, n: float) -> float:
    p = counts[counts > 0] / n
    return float(-np.sum(p * np.log(p)))


def normalized_mutual_info(labels_true: Any, labels_pred: Any) -> float:
    """NMI with the arithmetic-mean normalisation ``I / ((H_true + H_pred) / 2)``.

    That is scikit-learn's default (``average_method="arithmetic"``); natural logarithms, float64.
    Two single-cluster partitions score 1.0, as in scikit-learn.
    """
    a, b = _as_labels(labels_true, "labels_true"), _as_labels(labels_pred, "labels_pred")
    n = float(len(a))
    nij, ri, cj, rows, cols = _contingency(a, b)
    if len(rows) == len(cols) == 1 or n == 0:
        return 1.0
    mi = float(np.sum(nij / n * (np.log(nij * n) - np.log(ri * cj))))
    h = (_entropy(rows, n) + _entropy(cols, n)) / 2.0
    return 0.0 if h == 0 else min(1.0, max(0.0, mi / h))


def homogeneity(labels_true: Any, labels_pred: Any) -> float:
    """Homogeneity (Rosenberg & Hirschberg 2007): ``1 - H(true | pred) / H(true)``.

    1.0 when every cluster holds a single class, however many clusters there are. Pseudo-labels
    over-cluster on purpose (``N / 10`` clusters, FINCH's finest level), and NMI punishes that:
    6 equal classes split into 46 pure clusters of about equal size have NMI about 0.64, the
    most that clusters of those sizes can reach. Homogeneity scores their purity as 1.0. Same
    value as scikit-learn's ``homogeneity_score``; one class scores 1.0.
    """
    a, b = _as_labels(labels_true, "labels_true"), _as_labels(labels_pred, "labels_pred")
    n = float(len(a))
    if n == 0:
        return 1.0
    nij, _, cj, rows, _ = _contingency(a, b)
    h_true = _entropy(rows, n)
    if h_true == 0:
        return 1.0
    # H(true | pred) = -sum_ij n_ij / n log(n_ij / n_j)
    h_cond = float(-np.sum(nij / n * (np.log(nij) - np.log(cj))))
    return min(1.0, max(0.0, 1.0 - h_cond / h_true))


def adjusted_mutual_info(labels_true: Any, labels_pred: Any) -> float:
    """AMI (Vinh et al. 2010, arithmetic normalisation) from scikit-learn.

    The expected mutual information costs about O(N x clusters) here; fine for a feature bank.
    """
    try:
        from sklearn.metrics import adjusted_mutual_info_score
    except ImportError as err:  # pragma: no cover - scikit-learn is a dependency
        msg = "adjusted_mutual_info needs scikit-learn (pip install scikit-learn)"
        raise ImportError(msg) from err
    a, b = _as_labels(labels_true, "labels_true"), _as_labels(labels_pred, "labels_pred")
    return float(adjusted_mutual_info_score(a, b))


def cluster_stats(labels: Any) -> Dict[str, float]:
    """Cluster count and sizes of one partition: count, min/median/max size, singletons."""
    lab = _as_labels(labels, "labels")
    if len(lab) == 0:
        raise ValueError("labels is empty")
    _, sizes = np.unique(lab, return_counts=True)
    return {
        "num_clusters": int(len(sizes)),
        "size_min": int(sizes.min()),
        "size_median": float(np.median(sizes)),
        "size_max": int(sizes.max()),
        "singletons": int(np.sum(sizes == 1)),
    }


def clustering_metrics(
    labels: Any, truth: Optional[Any] = None, *, ami: bool = True
) -> Dict[str, float]:
    """:func:`cluster_stats` of ``labels`` plus NMI, homogeneity, AMI, ARI against ``truth``.

    Entries of ``truth`` below 0 (``-1``: unknown, the batch convention) are left out of the
    agreement scores; ``labelled`` says how many samples were scored. ``ami=False`` skips AMI,
    the slowest of the three.
    """
    out: Dict[str, float] = dict(cluster_stats(labels))
    if truth is None:
        return out
    lab, tru = _as_labels(labels, "labels"), _as_labels(truth, "truth")
    if len(lab) != len(tru):
        raise ValueError(f"labels ({len(lab)}) and truth ({len(tru)}) differ in length")
    known = tru >= 0
    out["labelled"] = int(known.sum())
    if known.sum() == 0:
        return out
    lab, tru = lab[known], tru[known]
    out["nmi"] = normalized_mutual_info(tru, lab)
    out["homogeneity"] = homogeneity(tru, lab)
    out["ari"] = adjusted_rand_index(tru, lab)
    if ami:
        out["ami"] = adjusted_mutual_info(tru, lab)
    return out


def pair_error_rates(pseudo: Any, truth: Any) -> Dict[str, float]:
    """How often cluster positives and negatives are wrong with respect to the ground truth.

    Averaged over anchors ``a`` with a known class (``truth >= 0``; unknown ones are left out):

    - ``positive_fp_rate``: the share of the *other* members of ``a``'s cluster whose class
      differs from ``a``'s, over anchors whose cluster has another member. It is the chance
      that a positive drawn from the cluster (as ``ClusterBatchSampler`` draws them) is false.
    - ``negative_fn_rate``: the share of the videos outside ``a``'s cluster that have ``a``'s
      class: the chance that a negative drawn outside the cluster is a false negative.

    These are vidssl's measures: SLIC's official code (rvl-lab-utoronto/video_similarity_search
    at commit 4004682, ``online_train.py``) logs only NMI and AMI against the true labels at each
    re-clustering, no false-positive or false-negative rates. Computed from the contingency table
    in float64, ``O(N + K C)``.

    Args:
        pseudo: ``N`` cluster labels (any integers).
        truth: ``N`` class labels, ``-1`` where unknown.
    """
    p = _as_array(pseudo)
    t = _as_array(truth)
    if p.shape != t.shape:
        raise ValueError(f"pseudo ({p.shape[0]}) and truth ({t.shape[0]}) differ in length.")
    known = t >= 0
    p, t = p[known], t[known]
    n = p.shape[0]
    if n == 0:
        return {}
    _, pi = np.unique(p, return_inverse=True)
    _, ti = np.unique(t, return_inverse=True)
    cont = np.zeros((pi.max() + 1, ti.max() + 1), dtype=np.float64)
    np.add.at(cont, (pi, ti), 1.0)
    a = cont.sum(axis=1)  # cluster sizes
    b = cont.sum(axis=0)  # class sizes
    # Anchors in cell (cluster j, class i) count n_ji each.
    others_in = a[:, None] - 1.0  # other members of the anchor's cluster
    wrong_in = a[:, None] - cont  # of those, other classes
    with np.errstate(divide="ignore", invalid="ignore"):
        fp = np.where(others_in > 0, wrong_in / others_in, 0.0)
        outside = n - a[:, None]
        fn = np.where(outside > 0, (b[None, :] - cont) / outside, 0.0)
    has_other = np.broadcast_to(others_in > 0, cont.shape)
    has_outside = np.broadcast_to(outside > 0, cont.shape)
    out: Dict[str, float] = {}
    if (cont * has_other).sum() > 0:
        out["positive_fp_rate"] = float((cont * fp).sum() / (cont * has_other).sum())
    if (cont * has_outside).sum() > 0:
        out["negative_fn_rate"] = float((cont * fn).sum() / (cont * has_outside).sum())
    return out


def _as_array(x: Any) -> np.ndarray:
    """Return ``x`` (a numpy array, a list, or a torch tensor on any device) flat in numpy."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x).reshape(-1)
