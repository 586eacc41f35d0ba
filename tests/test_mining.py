import itertools
import math

import pytest
import torch

from vidssl.losses.mining import (
    cluster_contrastive_loss,
    cluster_triplet_loss,
    hard_negative_mask,
    label_distances,
    labels_or_instances,
    pairwise_cosine_distance,
    select_semi_hard_negatives,
    temporal_discrimination_loss,
)


def _cos_d(u, v):
    u, v = u.double().tolist(), v.double().tolist()
    dot = sum(a * b for a, b in zip(u, v))
    nu = math.sqrt(sum(a * a for a in u))
    nv = math.sqrt(sum(b * b for b in v))
    return 1.0 - dot / (nu * nv)


def test_cosine_distance_matches_formula():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 5, generator=g), torch.randn(3, 5, generator=g)
    d = pairwise_cosine_distance(x, y)
    for i, j in itertools.product(range(4), range(3)):
        assert d[i, j].item() == pytest.approx(_cos_d(x[i], y[j]), abs=1e-6)


def test_labels_or_instances():
    pl = torch.tensor([3, -1, 3, 0])
    out = labels_or_instances(pl, torch.tensor([0, 1, 2, 1, 3]))
    assert out.tolist() == [3, -3, 3, -3, 0]
    assert labels_or_instances(None, torch.tensor([0, 5])).tolist() == [-2, -7]


def test_semi_hard_selection_draws_only_candidates_and_falls_back_to_closest():
    dist = torch.tensor(
        [
            [0.10, 0.50, 0.25, 0.90, 0.05],  # d_ap=0.1, m=0.2: allowed < 0.3: {2, 4}
            [0.90, 0.80, 0.70, 0.95, 0.60],  # d_ap=0.1: no candidate -> closest allowed negative
            [0.10, 0.20, 0.30, 0.40, 0.50],  # no allowed negative at all -> -1
        ]
    )
    ap = torch.tensor([0.1, 0.1, 0.1])
    mask = torch.tensor(
        [[False, True, True, True, True], [True, True, True, True, False], [False] * 5]
    )
    seen = set()
    for seed in range(60):
        out = select_semi_hard_negatives(dist, ap, mask, 0.2, torch.Generator().manual_seed(seed))
        seen.add(out[0].item())
        assert out[1].item() == 2  # 0.70 is the closest among the allowed {0, 1, 2, 3}
        assert out[2].item() == -1
    assert seen == {2, 4}  # both candidates drawn, nothing else


def _triplet_loop(emb, labels, negatives, margin):
    """Direct computation for given triplet choices, with all pairs i < j of the same label."""
    total, count = 0.0, 0
    for i, j in itertools.combinations(range(len(labels)), 2):
        if labels[i] != labels[j]:
            continue
        n = negatives[(i, j)]
        total += max(0.0, _cos_d(emb[i], emb[j]) - _cos_d(emb[i], emb[n]) + margin)
        count += 1
    return total / count, count


def test_cluster_triplet_loss_matches_loop_and_picks_valid_negatives():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(8, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 0, 1, 3, 2])
    out = cluster_triplet_loss(emb, labels, margin=0.2, generator=torch.Generator().manual_seed(2))
    pairs = list(zip(out.anchor.tolist(), out.positive.tolist()))
    expected_pairs = [
        (i, j) for i, j in itertools.combinations(range(8), 2) if labels[i] == labels[j]
    ]
    assert sorted(pairs) == expected_pairs
    chosen = dict(zip(pairs, out.negative.tolist()))
    for (i, j), n in chosen.items():
        assert labels[n] != labels[i]
        d_ap, d_an = _cos_d(emb[i], emb[j]), _cos_d(emb[i], emb[n])
        others = [k for k in range(8) if labels[k] != labels[i]]
        semi = [k for k in others if _cos_d(emb[i], emb[k]) < d_ap + 0.2]
        if semi:
            assert n in semi
        else:
            assert d_an == pytest.approx(min(_cos_d(emb[i], emb[k]) for k in others))
    ref, count = _triplet_loop(emb, labels.tolist(), chosen, 0.2)
    assert out.loss.item() == pytest.approx(ref, abs=1e-9)
    assert count == len(pairs)


def test_cluster_triplet_loss_without_triplets_is_zero_and_differentiable():
    emb = torch.randn(3, 4, requires_grad=True)
    out = cluster_triplet_loss(emb, torch.tensor([0, 1, 2]))
    assert out.loss.item() == 0.0 and out.anchor.numel() == 0
    out.loss.backward()
    assert emb.grad is not None


def test_cluster_triplet_loss_gradient_is_bit_identical_across_repeats():
    # Large clusters make many triplets share rows. Gathering the rows by advanced indexing
    # accumulates their gradients with parallel atomic adds on a multi-threaded CPU, in a
    # different order each time; the loss must give the same gradient bit for bit.
    g = torch.Generator().manual_seed(0)
    emb0 = torch.randn(64, 128, generator=g)
    labels = torch.arange(64) % 2  # two clusters of 32: ~1000 triplets x 128 numbers
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the parallel path needs more than one thread
    try:
        grads = set()
        for _ in range(10):
            emb = emb0.clone().requires_grad_()
            draw = torch.Generator().manual_seed(1)
            out = cluster_triplet_loss(emb, labels, margin=2.0, generator=draw)
            out.loss.backward()
            grads.add(emb.grad.numpy().tobytes())
    finally:
        torch.set_num_threads(threads)
    assert out.anchor.numel() * 128 >= 32768  # enough to take the parallel path
    assert len(grads) == 1


def test_label_distances_match_pair_loop():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, -9])
    pairs = [(i, j) for i, j in itertools.product(range(7), range(7)) if i != j]
    same = [_cos_d(x[i], x[j]) for i, j in pairs if labels[i] == labels[j]]
    other = [_cos_d(x[i], x[j]) for i, j in pairs if labels[i] != labels[j]]
    out = label_distances(x, labels)
    assert out["dist_same"].item() == pytest.approx(sum(same) / len(same), abs=1e-9)
    assert out["dist_other"].item() == pytest.approx(sum(other) / len(other), abs=1e-9)


def test_label_distances_show_a_collapsed_embedding_and_a_single_label():
    # every row the same direction (different lengths): both distances 0
    rows = torch.tensor([[1.0, 2.0, 0.5]]) * torch.tensor([[1.0], [3.0], [0.2], [7.0]])
    out = label_distances(rows, torch.tensor([0, 0, 1, 1]))
    assert out["dist_same"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["dist_other"].item() == pytest.approx(0.0, abs=1e-6)
    # one label: there is no pair of other labels to average over
    one = label_distances(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
    assert math.isnan(one["dist_other"].item()) and not math.isnan(one["dist_same"].item())


def test_temporal_discrimination_loss_matches_formula():
    g = torch.Generator().manual_seed(3)
    a, a2, p = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    ref = sum(max(0.0, _cos_d(a[i], a2[i]) - _cos_d(a[i], p[i]) + 0.04) for i in range(5)) / 5
    assert temporal_discrimination_loss(a, a2, p, 0.04).item() == pytest.approx(ref, abs=1e-9)
    # and as SLIC computes it: MarginRankingLoss(d_aa', d_ap, target=-1)
    d_aa = 1 - torch.nn.functional.cosine_similarity(a, a2)
    d_ap = 1 - torch.nn.functional.cosine_similarity(a, p)
    slic = torch.nn.MarginRankingLoss(margin=0.04)(d_aa, d_ap, -torch.ones(5, dtype=a.dtype))
    assert slic.item() == pytest.approx(ref, abs=1e-9)


def test_hard_negative_mask_matches_sorting_loop():
    g = torch.Generator().manual_seed(4)
    sim = torch.rand(3, 2000, generator=g)
    neg = torch.rand(3, 2000, generator=g) > 0.3
    neg[2] = False
    neg[2, :7] = True  # a row with few negatives keeps at least one, drops none
    kept = hard_negative_mask(sim, neg, keep_fraction=0.05, drop_fraction=0.001)
    for r in range(3):
        cols = [c for c in range(2000) if neg[r, c]]
        cols.sort(key=lambda c: -sim[r, c].item())
        n = len(cols)
        drop, keep = math.floor(n * 0.001), math.ceil(n * 0.05)
        assert set(torch.nonzero(kept[r]).flatten().tolist()) == set(cols[drop : drop + keep])
    assert kept[2].sum() == 1 and kept[2, torch.argmax(torch.where(neg[2], sim[2], -1.0))]
    with pytest.raises(ValueError, match="keep_fraction"):
        hard_negative_mask(sim, neg, keep_fraction=0.0)


def test_cluster_contrastive_loss_matches_loop():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(4, 3, generator=g, dtype=torch.float64)
    k = torch.randn(6, 3, generator=g, dtype=torch.float64)
    pos = torch.tensor(
        [
            [1, 0, 0, 1, 0, 0],
            [0, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],  # no positive: not counted
            [0, 0, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    neg = torch.tensor(
        [
            [0, 1, 1, 0, 1, 0],
            [1, 0, 0, 0, 0, 1],
            [1, 1, 1, 1, 1, 1],
            [0, 0, 0, 0, 0, 0],  # no negative: loss of each positive is log(1) = 0
        ],
        dtype=torch.bool,
    )
    t = 0.1
    per_query = []
    for i in range(4):
        ps = [j for j in range(6) if pos[i, j]]
        if not ps:
            continue
        s = [1 - _cos_d(q[i], k[j]) for j in range(6)]
        negsum = sum(math.exp(s[j] / t) for j in range(6) if neg[i, j])
        per_query.append(
            sum(-math.log(math.exp(s[p] / t) / (math.exp(s[p] / t) + negsum)) for p in ps)
            / len(ps)
        )
    ref = sum(per_query) / len(per_query)
    assert cluster_contrastive_loss(q, k, pos, neg, t).item() == pytest.approx(ref, abs=1e-9)
