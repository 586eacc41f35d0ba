"""Triplet margin loss with cosine distance, as the cluster-guided methods use it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cosine_distance", "triplet_margin_cosine"]


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return ``1 - cos(a_i, b_i)`` row by row for ``B x D`` tensors (a ``B`` tensor in [0, 2])."""
    return 1.0 - F.cosine_similarity(a, b, dim=1)


def triplet_margin_cosine(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    margin: float = 0.5,
) -> torch.Tensor:
    """Triplet margin loss ``mean(max(0, d(a, p) - d(a, n) + margin))`` with ``d = 1 - cos``.

    Args:
        anchor: ``B x D`` anchor embeddings.
        positive: ``B x D``, row ``i`` should be closer to ``anchor[i]`` ...
        negative: ``B x D``, ... than row ``i`` of these, by at least ``margin``.
        margin: required gap in cosine distance (range of ``d`` is [0, 2]). The default 0.5 is a
            middle value of that range; set the one of the method you reproduce.

    Returns:
        A scalar tensor.
    """
    if not (anchor.shape == positive.shape == negative.shape) or anchor.ndim != 2:
        raise ValueError(
            "triplet_margin_cosine needs anchor, positive and negative of one shape B x D, got "
            f"{tuple(anchor.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}"
        )
    gap = cosine_distance(anchor, positive) - cosine_distance(anchor, negative) + margin
    return F.relu(gap).mean()
