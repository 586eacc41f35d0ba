"""Losses against independent numpy computations, symmetry and temperature limits."""

import math

import numpy as np
import pytest
import torch

from vidssl.losses import info_nce, nt_xent, triplet_margin_cosine


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _nt_xent_loop(z1, z2, t):
    """SimCLR's eq. (1) written as a double loop over the 2N views."""
    z = _unit(np.concatenate([z1, z2]).astype(np.float64))
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(z[i] @ z[k] / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(z[i] @ z[j] / t) / denom)
    return total / (2 * n)


def _info_nce_loop(q, k, neg, t):
    q, k = _unit(q.astype(np.float64)), _unit(k.astype(np.float64))
    total = 0.0
    for i in range(len(q)):
        negs = _unit(neg.astype(np.float64)) if neg is not None else np.delete(k, i, axis=0)
        pos = math.exp(q[i] @ k[i] / t)
        total += -math.log(pos / (pos + sum(math.exp(q[i] @ m / t) for m in negs)))
    return total / len(q)


@pytest.mark.parametrize("t", [0.07, 0.1, 0.5, 1.0])
def test_nt_xent_matches_loop(t):
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    got = nt_xent(torch.tensor(z1), torch.tensor(z2), temperature=t).item()
    assert got == pytest.approx(_nt_xent_loop(z1, z2, t), rel=1e-9)


def test_nt_xent_symmetric_and_scale_invariant():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    assert nt_xent(z1, z2).item() == pytest.approx(nt_xent(z2, z1).item(), rel=1e-6)
    # Cosine similarity: scaling a row changes nothing.
    assert nt_xent(3 * z1, z2).item() == pytest.approx(nt_xent(z1, z2).item(), rel=1e-6)


def test_nt_xent_temperature_limits():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    # t -> infinity: uniform softmax over the 2N - 1 candidates.
    assert nt_xent(z1, z2, temperature=1e6).item() == pytest.approx(math.log(7), rel=1e-4)
    # t -> 0 with perfect positives and orthogonal negatives: loss -> 0.
    eye = torch.eye(4, 8)
    assert nt_xent(eye, eye.clone(), temperature=0.01).item() < 1e-6


def test_nt_xent_gradient_matches_numeric():
    g = torch.Generator().manual_seed(3)
    z1 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.2), (z1, z2))


@pytest.mark.parametrize("with_queue", [True, False])
def test_info_nce_matches_loop(with_queue):
    rng = np.random.default_rng(4)
    q, k = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    neg = rng.normal(size=(10, 6)) if with_queue else None
    got = info_nce(
        torch.tensor(q), torch.tensor(k), None if neg is None else torch.tensor(neg), 0.2
    ).item()
    assert got == pytest.approx(_info_nce_loop(q, k, neg, 0.2), rel=1e-9)


def test_info_nce_negative_mask_leaves_keys_out_per_query():
    rng = np.random.default_rng(6)
    q, k, neg = rng.normal(size=(3, 6)), rng.normal(size=(3, 6)), rng.normal(size=(7, 6))
    mask = rng.random((3, 7)) < 0.6
    mask[0] = False  # a query with no negative left: only its positive, loss 0
    got = info_nce(torch.tensor(q), torch.tensor(k), torch.tensor(neg), 0.2,
                   negative_mask=torch.tensor(mask))  # fmt: skip
    # Independently: each query against only its own negatives, averaged over queries.
    per_query = [_info_nce_loop(q[i : i + 1], k[i : i + 1], neg[mask[i]], 0.2) for i in range(3)]
    assert got.item() == pytest.approx(np.mean(per_query), rel=1e-9)
    assert per_query[0] == 0.0


def test_info_nce_temperature_limits():
    g = torch.Generator().manual_seed(5)
    q, k, neg = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(9, 8)
    assert info_nce(q, k, neg, temperature=1e6).item() == pytest.approx(math.log(10), rel=1e-4)
    # Key equal to the query and negatives opposite: loss -> 0 as t -> 0.
    assert info_nce(q[:1], q[:1].clone(), -q[:1], 0.01).item() < 1e-6


def test_triplet_margin_cosine_matches_numpy():
    rng = np.random.default_rng(6)
    a, p, n = (rng.normal(size=(8, 5)) for _ in range(3))

    def d(x, y):
        return 1 - (_unit(x) * _unit(y)).sum(1)

    for margin in (0.0, 0.2, 1.0):
        expected = np.maximum(0, d(a, p) - d(a, n) + margin).mean()
        got = triplet_margin_cosine(torch.tensor(a), torch.tensor(p), torch.tensor(n), margin)
        assert got.item() == pytest.approx(expected, rel=1e-9)


def test_triplet_zero_when_separated_and_margin_when_equal():
    a = torch.tensor([[1.0, 0.0]])
    # Positive identical, negative opposite: d(a,p)=0, d(a,n)=2 -> hinge inactive for margin<2.
    assert triplet_margin_cosine(a, a, -a, margin=1.5).item() == 0.0
    # Positive and negative equal: the loss is exactly the margin.
    assert triplet_margin_cosine(a, -a, -a, margin=0.3).item() == pytest.approx(0.3)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="B x D"):
        nt_xent(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="B x D"):
        info_nce(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="B x D"):
        triplet_margin_cosine(torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 4))
