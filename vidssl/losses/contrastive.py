"""Contrastive losses: NT-Xent (SimCLR) and InfoNCE (MoCo), as plain functions.

Both compare L2-normalised embeddings by cosine similarity divided by a temperature.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vidssl.distributed import gather_with_grad, get_rank

__all__ = ["info_nce", "nt_xent"]


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, gather: bool = True
) -> torch.Tensor:
    """Normalised temperature-scaled cross entropy over 2N views (SimCLR, Chen et al. 2020).

    For every view ``z_i`` with positive ``z_j`` (the other view of the same sample), the loss is
    ``-log exp(s_ij / t) / sum_{k != i} exp(s_ik / t)`` with ``s`` the cosine similarity, averaged
    over all 2N views; the 2N - 2 other views are the negatives.

    Under DDP (with ``gather=True``) the candidates are the views of every rank, gathered with a
    gradient-correct all_gather, and each rank averages over its own 2B anchors: the mean of the
    ranks' losses equals the single-process loss over the concatenated batch.

    Args:
        z1: ``B x D`` embeddings of the first views (normalised here).
        z2: ``B x D`` embeddings of the second views, row ``i`` the positive of ``z1[i]``.
        temperature: softmax temperature (SimCLR reference code default 0.1; CVRL uses 0.1 too).
        gather: take negatives from every rank when a process group is initialised.

    Returns:
        A scalar tensor.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"nt_xent needs two B x D tensors of one shape, got "
            f"{tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    z1 = F.normalize(z1, dim=1)
    z2 = F.normalize(z2, dim=1)
    b = z1.shape[0]
    if gather:
        all1, all2 = gather_with_grad(z1), gather_with_grad(z2)
    else:
        all1, all2 = z1, z2
    n = all1.shape[0]  # world_size * B
    offset = get_rank() * b if n != b else 0
    candidates = torch.cat([all1, all2], dim=0)  # 2n x D
    anchors = torch.cat([z1, z2], dim=0)  # 2B x D
    logits = anchors @ candidates.T / temperature
    local = torch.arange(b, device=z1.device) + offset
    self_idx = torch.cat([local, local + n])
    pos_idx = torch.cat([local + n, local])
    rows = torch.arange(2 * b, device=z1.device)
    # A view is not its own negative.
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[rows, self_idx] = True
    logits = logits.masked_fill(is_self, float("-inf"))
    return F.cross_entropy(logits, pos_idx)


def info_nce(
    query: torch.Tensor,
    positive_key: torch.Tensor,
    negative_keys: Optional[torch.Tensor] = None,
    temperature: float = 0.07,
    negative_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """InfoNCE (van den Oord et al. 2018) as MoCo computes it (He et al. 2020, eq. 1).

    ``-log exp(q.k+ / t) / (exp(q.k+ / t) + sum_k- exp(q.k- / t))`` with cosine similarities,
    averaged over the queries.

    Args:
        query: ``B x D`` queries (normalised here).
        positive_key: ``B x D`` keys, row ``i`` the positive of ``query[i]`` (normalised here).
        negative_keys: ``K x D`` negatives shared by every query (MoCo's queue). ``None`` uses
            the other rows of ``positive_key`` as negatives (in-batch InfoNCE).
        temperature: softmax temperature (MoCo v1: 0.07, MoCo v2: 0.2).
        negative_mask: ``B x K`` bool, which of ``negative_keys`` are negatives of each query
            (``None``: all); the others are left out of that query's sum.

    Returns:
        A scalar tensor.
    """
    if query.shape != positive_key.shape or query.ndim != 2:
        raise ValueError(
            f"info_nce needs query and positive_key of one shape B x D, got "
            f"{tuple(query.shape)} and {tuple(positive_key.shape)}"
        )
    q = F.normalize(query, dim=1)
    k = F.normalize(positive_key, dim=1)
    if negative_keys is None:
        logits = q @ k.T / temperature
        target = torch.arange(q.shape[0], device=q.device)
        return F.cross_entropy(logits, target)
    neg = F.normalize(negative_keys, dim=1)
    pos = (q * k).sum(dim=1, keepdim=True)
    neg_logits = q @ neg.T
    if negative_mask is not None:
        neg_logits = neg_logits.masked_fill(~negative_mask, -float("inf"))
    logits = torch.cat([pos, neg_logits], dim=1) / temperature
    # The positive is column 0 of every row (MoCo's labels = zeros).
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)
