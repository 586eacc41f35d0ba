import numpy as np
import pytest
import torch

from vidssl.data.cluster_sampler import ClusterBatchSampler


def _labels(n=120, k=7, seed=0):
    g = np.random.default_rng(seed)
    lab = g.integers(0, k, size=n)
    lab[:5] = 100 + np.arange(5)  # five singletons
    lab[5:10] = -1  # five unlabelled videos
    return torch.as_tensor(lab)


def _pairs(sampler):
    return [pair for batch in sampler for pair in batch]


def test_positives_stay_in_the_anchor_cluster_and_differ_when_possible():
    labels = _labels()
    s = ClusterBatchSampler(len(labels), batch_size=16, p_same=0.0, labels=labels, seed=3)
    pairs = _pairs(s)
    assert sorted(a for a, _ in pairs) == list(range(len(labels)))
    lab = labels.numpy()
    counts = {c: int((lab == c).sum()) for c in set(lab.tolist())}
    for a, p in pairs:
        if lab[a] < 0 or counts[lab[a]] == 1:
            assert p == a  # unlabelled or singleton: the same video
        else:
            assert p != a and lab[p] == lab[a]


def test_no_labels_gives_same_video_pairs():
    s = ClusterBatchSampler(10, batch_size=4, p_same=0.0)
    assert all(a == p for a, p in _pairs(s))


def test_p_same_frequency_and_uniform_choice_within_cluster():
    n = 4000
    labels = torch.arange(n) // 4  # clusters of 4
    s = ClusterBatchSampler(n, batch_size=500, p_same=0.3, labels=labels, seed=0)
    same = np.mean([a == p for a, p in _pairs(s)])
    # binomial std at n=4000 is 0.0072: 5 sigma
    assert abs(same - 0.3) < 0.036
    # the 3 other members of a cluster are chosen uniformly
    hits = np.zeros(4)
    for epoch in range(30):
        s.set_epoch(epoch)
        for a, p in _pairs(s):
            if a % 4 == 0 and p != a:
                hits[p % 4] += 1
    assert hits[0] == 0
    frac = hits[1:] / hits[1:].sum()
    assert np.all(np.abs(frac - 1 / 3) < 0.03)


@pytest.mark.parametrize("n,world", [(100, 2), (101, 3), (7, 4)])
def test_shards_are_disjoint_cover_and_have_equal_batch_counts(n, world):
    labels = torch.arange(n) % 5
    shards = [
        ClusterBatchSampler(n, 8, labels=labels, seed=1, num_replicas=world, rank=r)
        for r in range(world)
    ]
    for s in shards:
        s.set_epoch(4)
    per_rank = [_pairs(s) for s in shards]
    assert len({len(list(iter(s))) for s in shards}) == 1
    assert all(len(list(iter(s))) == len(s) for s in shards)
    anchors = [a for pairs in per_rank for a, _ in pairs]
    assert set(anchors) == set(range(n))  # covering
    pad = -(-n // world) * world - n
    assert len(anchors) == n + pad  # disjoint up to DistributedSampler-style padding
    if pad == 0:
        assert len(set(anchors)) == n
    # the shards are slices of the same epoch: together they equal the single-process epoch
    single = ClusterBatchSampler(n, 8, labels=labels, seed=1, num_replicas=world, rank=0)
    single.set_epoch(4)
    rows = single.epoch_pairs()
    for r in range(world):
        assert [tuple(x) for x in rows[r::world].tolist()] == per_rank[r]


def test_deterministic_under_seed_and_epoch():
    labels = _labels()
    a = ClusterBatchSampler(len(labels), 16, labels=labels, seed=5)
    b = ClusterBatchSampler(len(labels), 16, labels=labels, seed=5)
    a.set_epoch(2)
    b.set_epoch(2)
    assert _pairs(a) == _pairs(b)
    assert _pairs(a) == _pairs(a)  # re-iterating the same epoch repeats it
    b.set_epoch(3)
    assert _pairs(a) != _pairs(b)
    c = ClusterBatchSampler(len(labels), 16, labels=labels, seed=6)
    c.set_epoch(2)
    assert _pairs(a) != _pairs(c)


def test_set_labels_takes_effect_at_the_next_iteration():
    n = 40
    s = ClusterBatchSampler(n, 5, p_same=0.0, seed=0)
    it = iter(s)
    first = next(it)
    s.set_labels(torch.arange(n) // 2)
    rest = [pair for batch in it for pair in batch]
    assert all(a == p for a, p in first + rest)  # the running epoch is unchanged
    assert all(a != p and a // 2 == p // 2 for a, p in _pairs(s))


def test_state_dict_round_trip_reproduces_the_epoch():
    labels = _labels()
    s = ClusterBatchSampler(len(labels), 16, labels=labels, seed=9)
    s.set_epoch(7)
    t = ClusterBatchSampler(len(labels), 16, seed=0)
    t.load_state_dict(s.state_dict())
    assert torch.equal(t.labels, labels)
    assert _pairs(t) == _pairs(s)


def test_drop_last_and_len():
    s = ClusterBatchSampler(10, 4, drop_last=True)
    assert len(s) == 2 and [len(b) for b in s] == [4, 4]
    s = ClusterBatchSampler(10, 4)
    assert len(s) == 3 and [len(b) for b in s] == [4, 4, 2]


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="p_same"):
        ClusterBatchSampler(10, 2, p_same=1.5)
    s = ClusterBatchSampler(10, 2)
    with pytest.raises(ValueError, match="one label per training video"):
        s.set_labels(torch.zeros(9, dtype=torch.long))


def test_lightning_reaches_set_epoch_through_sampler_attribute():
    from lightning_fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    s = ClusterBatchSampler(10, 2)
    dl = DataLoader(list(range(10)), batch_sampler=s, collate_fn=lambda x: x)
    _set_sampler_epoch(dl, 6)
    assert s.epoch == 6


def test_resumed_mid_epoch_the_sampler_skips_the_batches_already_trained_on():
    labels = torch.arange(12) % 3
    full = ClusterBatchSampler(12, 2, labels=labels, seed=4)
    full.set_epoch(1)
    s = ClusterBatchSampler(12, 2, seed=0)
    s.load_state_dict({**full.state_dict(), "batches_done": 2})
    assert s.epoch == 1 and len(s) == len(full)
    assert list(s) == list(full)[2:]
    assert list(s) == list(full)  # only the first iteration after the resume skips
