"""Tests of vidssl.clustering: FINCH against finch-clust, neighbours, merging, methods, metrics."""

from __future__ import annotations

import sys
import warnings
from math import comb

import numpy as np
import pytest

from vidssl.clustering import (
    adjusted_mutual_info,
    adjusted_rand_index,
    agglomerative,
    cluster,
    cluster_stats,
    clustering_metrics,
    finch,
    first_neighbour_recall,
    first_neighbours,
    homogeneity,
    kmeans,
    merge_to_count,
    normalized_mutual_info,
)
from vidssl.clustering import neighbours as neighbours_module
from vidssl.clustering.neighbours import (
    _faiss_exact_topk,
    _rank_rows,
    _torch_topk_rows,
    exact_topk,
    normalize_rows,
)

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def blobs(n: int, d: int, k: int, seed: int, spread: float = 0.3):
    """Gaussian blobs around random unit centres; returns (float32 features, true labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.integers(0, k, n)
    x = centres[truth] + spread * rng.standard_normal((n, d)) / np.sqrt(d)
    return x.astype(np.float32), truth


def reference_finch(x, req_clust=None):
    """finch-clust's FINCH with its defaults (exact pairwise path below 20k points)."""
    # finch-clust imports pynndescent at import time (a numba JIT taking ~10 s) though it only
    # uses it above 20k points; these tests stay below, so keep it from loading.
    hidden = "pynndescent" not in sys.modules
    if hidden:
        sys.modules["pynndescent"] = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # finch-clust warns that pynndescent is missing
            from finch import FINCH
    finally:
        if hidden:
            del sys.modules["pynndescent"]
    return FINCH(x, req_clust=req_clust, verbose=False)


# --- FINCH against the reference implementation ------------------------------------------------


@pytest.mark.parametrize("n,d,k,seed", [(3000, 32, 20, 0), (2000, 128, 50, 1), (2500, 8, 10, 3)])
def test_finch_matches_finch_clust_on_every_level(n, d, k, seed):
    x, _ = blobs(n, d, k, seed)
    ref, ref_nums, _ = reference_finch(x)
    res = finch(x)
    assert res.num_clusters == list(ref_nums)
    assert res.partitions.shape == ref.shape
    for level in range(ref.shape[1]):
        assert adjusted_rand_index(ref[:, level], res.partitions[:, level]) == 1.0
    # Labels are even numbered the same way (by first sample), not only the same partition.
    np.testing.assert_array_equal(res.partitions, ref)


@pytest.mark.parametrize("req", [400, 25, 7])
def test_requested_count_matches_finch_clust(req):
    x, _ = blobs(3000, 32, 20, 0)
    _, nums, ref = reference_finch(x, req_clust=req)
    res = finch(x, req_clust=req)
    assert len(np.unique(res.requested)) == req
    assert adjusted_rand_index(ref, res.requested) == 1.0
    assert req not in nums  # the merge path was exercised, not a ready level


def test_requested_count_edge_cases():
    x, _ = blobs(1000, 16, 10, 2)
    res = finch(x, req_clust=10**6)  # more than the finest level: the finest level
    np.testing.assert_array_equal(res.requested, res.partitions[:, 0])
    res = finch(x, req_clust=int(finch(x).num_clusters[1]))  # a level's own count
    np.testing.assert_array_equal(res.requested, res.partitions[:, 1])
    with pytest.raises(ValueError, match="req_clust"):
        finch(x, req_clust=0)


def naive_merge(x, labels, target):
    """Reference: full pairwise cosine distances of the means after every single merge."""
    labels = labels.copy()
    while len(np.unique(labels)) > target:
        ids = np.unique(labels)
        means = np.stack([x[labels == i].astype(np.float64).mean(0) for i in ids])
        means /= np.linalg.norm(means, axis=1, keepdims=True)
        dist = 1.0 - means @ means.T
        np.fill_diagonal(dist, np.inf)
        a, b = np.unravel_index(np.argmin(dist), dist.shape)
        labels[labels == ids[b]] = ids[a]
    return labels


def test_merge_to_count_equals_naive_merging():
    x, _ = blobs(600, 8, 6, 4)
    start = finch(x).partitions[:, 0]
    for target in (start.max() // 2, 5, 1):
        got = merge_to_count(x, start, int(target))
        assert len(np.unique(got)) == target
        assert adjusted_rand_index(naive_merge(x, start, int(target)), got) == 1.0
    with pytest.raises(ValueError, match="target"):
        merge_to_count(x, start, int(start.max()) + 2)


def test_levels_nest_and_counts_decrease():
    x, _ = blobs(2000, 16, 12, 5)
    res = finch(x)
    assert all(a > b for a, b in zip(res.num_clusters, res.num_clusters[1:]))
    for lo in range(res.partitions.shape[1] - 1):
        # every finer cluster lies inside exactly one coarser cluster
        pairs = np.unique(res.partitions[:, lo : lo + 2], axis=0)
        assert len(pairs) == res.num_clusters[lo]
    assert res.labels(-1) is not None and res.labels(0).shape == (2000,)


def test_ensure_early_exit_prunes_long_edges():
    # Eight tight pairs spread around a circle: level 0 makes the pairs, and every pair's
    # nearest pair is far further than any level-0 edge, so pruning stops after level 0.
    ang = np.repeat(np.arange(8) * 2 * np.pi / 8, 2) + np.tile([0.0, 0.001], 8)
    ang = ang + np.repeat(np.arange(8) * 0.05, 2)  # break the symmetry
    x = np.stack([np.cos(ang), np.sin(ang)], 1).astype(np.float32)
    assert finch(x, ensure_early_exit=True).num_clusters == [8]
    assert len(finch(x).num_clusters) > 1
    ref_nums = reference_finch(x)[1]
    assert finch(x).num_clusters == list(ref_nums)  # finch-clust's pruning is a no-op


def test_finch_tiny_and_invalid_inputs():
    assert finch(np.ones((1, 3))).num_clusters == [1]
    res = finch(np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert res.num_clusters == [1]
    with pytest.raises(ValueError, match="NaN"):
        finch(np.array([[np.nan, 1.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="cosine"):
        finch(np.ones((3, 2)), distance="euclidean")
    with pytest.raises(ValueError, match="exact, ivf, hnsw"):
        finch(np.ones((3, 2)), neighbours="annoy")


# --- first neighbours ----------------------------------------------------------------------------


def brute_first_neighbours(x):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = np.clip(1.0 - xn @ xn.T, 0, 2)
    np.fill_diagonal(dist, np.inf)
    return np.argmin(dist, axis=1)  # lowest index among ties


def test_duplicates_take_lowest_other_index():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((30, 6)).astype(np.float32)
    # Row 7 of base is repeated 12 times (more than the first candidate list holds).
    x = np.concatenate([base, np.repeat(base[7:8], 12, 0), base[:5]])
    rng.shuffle(x)
    nn, dist = first_neighbours(x)
    copies = np.flatnonzero((x == base[7]).all(1))
    for i in copies:
        assert nn[i] == min(j for j in copies if j != i)
    assert np.all(nn != np.arange(len(x)))
    twins = np.flatnonzero((x == base[0]).all(1))
    assert nn[twins[0]] == twins[1] and nn[twins[1]] == twins[0]
    assert dist[copies].max() <= 1e-6


def test_exact_neighbours_match_brute_force_and_torch_path():
    x, _ = blobs(1500, 24, 15, 7)
    expected = brute_first_neighbours(x.astype(np.float64))
    faiss_nn, _ = first_neighbours(x)
    torch_nn, _ = first_neighbours(x, device="cpu", chunk_size=257)
    assert np.mean(faiss_nn == expected) == 1.0
    np.testing.assert_array_equal(torch_nn, faiss_nn)


def unit_rows(x):
    return np.ascontiguousarray(normalize_rows(x), dtype=np.float32)


def with_duplicates(seed):
    """Blobs where a tenth of the rows are exact copies of other rows (up to 9 copies each)."""
    x, _ = blobs(3000, 32, 30, seed)
    rng = np.random.default_rng(seed)
    src = rng.choice(3000, 60, replace=False)
    copies = np.repeat(x[src], rng.integers(1, 10, 60), axis=0)
    x = np.concatenate([x, copies])
    return x[rng.permutation(len(x))]


def tiny_clusters_and_singletons(seed):
    """A few big blobs, many clusters of 2-3 rows and isolated single rows."""
    big, _ = blobs(2000, 48, 8, seed, spread=0.2)
    small, _ = blobs(600, 48, 250, seed + 1, spread=0.05)
    single = np.random.default_rng(seed).standard_normal((77, 48)).astype(np.float32)
    return np.concatenate([big, small, single])


def assert_same_topk(xn, brute, pruned):
    """Same top-k as brute force: similarities within float32 rounding, same neighbour sets
    except where the k-th similarity is tied (within rounding) with a row left out."""
    (s0, i0), (s1, i1) = brute, pruned
    assert s1.dtype == np.float32 and i1.dtype == np.int64 and s1.shape == s0.shape
    assert np.all(np.diff(s1, axis=1) <= 0)  # descending
    np.testing.assert_allclose(s1, s0, rtol=0, atol=2e-6)
    x64 = xn.astype(np.float64)
    exact = np.einsum("nd,nkd->nk", x64, x64[i1])  # the returned pairs are consistent
    np.testing.assert_allclose(s1, exact, rtol=0, atol=2e-6)
    for row in np.flatnonzero((np.sort(i0, 1) != np.sort(i1, 1)).any(1)):
        odd = np.setxor1d(i0[row], i1[row])
        assert np.abs(x64[odd] @ x64[row] - s0[row, -1]).max() <= 2e-6, row
    return np.mean((np.sort(i0, 1) == np.sort(i1, 1)).all(1))


@pytest.mark.parametrize(
    "case",
    ["tight", "loose", "duplicates", "tiny clusters", "odd n"],
)
def test_pruned_topk_equals_brute_force(case):
    x = {
        "tight": lambda: blobs(3000, 64, 40, 20, spread=0.2)[0],
        "loose": lambda: blobs(2500, 16, 25, 21, spread=0.8)[0],
        "duplicates": lambda: with_duplicates(22),
        "tiny clusters": lambda: tiny_clusters_and_singletons(23),
        "odd n": lambda: blobs(2999, 24, 37, 24)[0],
    }[case]()
    xn = unit_rows(x)
    for k in (4, 9):
        sims, idx, info = exact_topk(xn, k, prune_min_points=0, prune_max_share=1.0)
        assert info["path"] == "pruned" and 0 < info["share"] < 1
        agree = assert_same_topk(xn, _faiss_exact_topk(xn, k), (sims, idx))
        assert agree > 0.99 if case != "duplicates" else agree > 0.9


def test_exact_search_prunes_only_when_it_pays():
    rng = np.random.default_rng(25)
    uniform = unit_rows(rng.standard_normal((4000, 256)).astype(np.float32))  # no structure
    _, _, info = exact_topk(uniform, 4, prune_min_points=0)
    assert info["path"] == "brute" and info["share"] > neighbours_module.PRUNE_MAX_SHARE
    tight = unit_rows(blobs(4000, 256, 40, 26, spread=0.3)[0])
    sims, idx, info = exact_topk(tight, 4, prune_min_points=0)
    assert info["path"] == "pruned" and info["share"] < 0.1
    assert_same_topk(tight, _faiss_exact_topk(tight, 4), (sims, idx))
    _, _, info = exact_topk(tight, 4)  # below PRUNE_MIN_POINTS: brute force, nothing tried
    assert info["path"] == "brute" and info["share"] is None
    # zero rows (angle undefined) are searched by brute force
    _, _, info = exact_topk(np.concatenate([tight, np.zeros((1, 256), np.float32)]), 4,
                            prune_min_points=0, prune_max_share=1.0)
    assert info["path"] == "brute"


def test_first_neighbours_and_finch_unchanged_by_pruning(monkeypatch):
    x = with_duplicates(27)
    for data in (x, x.astype(np.float64)):
        np.testing.assert_array_equal(
            first_neighbours(data, prune_min_points=0, prune_max_share=1.0)[0],
            first_neighbours(data)[0],
        )
    x, _ = blobs(3000, 32, 20, 0)
    ref, ref_nums, _ = reference_finch(x)
    monkeypatch.setattr(neighbours_module, "PRUNE_MIN_POINTS", 0)
    monkeypatch.setattr(neighbours_module, "PRUNE_MAX_SHARE", 1.0)
    np.testing.assert_array_equal(finch(x).partitions, ref)


def test_rank_slices_cover_the_bank_once_and_simulated_ranks_agree():
    for n, world in [(10, 3), (2, 4), (1001, 2), (7, 7)]:
        seen = np.concatenate([np.arange(*_rank_rows(n, r, world)[:2]) for r in range(world)])
        np.testing.assert_array_equal(seen, np.arange(n))
    x, _ = blobs(501, 16, 5, 8)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    parts = [_torch_topk_rows(xn, *_rank_rows(501, r, 2)[:2], 3, "cpu", 100) for r in range(2)]
    whole = _torch_topk_rows(xn, 0, 501, 3, "cpu", 64)
    np.testing.assert_array_equal(np.concatenate([p[1].numpy() for p in parts]), whole[1].numpy())


def rule_first_neighbours(x):
    """The documented rule, computed independently: float64 products of the normalised rows
    (as given), distances rounded to float32, lowest index among the least."""
    xn = normalize_rows(x).astype(np.float64)
    dist = np.clip(1.0 - xn @ xn.T, 0.0, 2.0).astype(np.float32)
    np.fill_diagonal(dist, np.inf)
    return np.argmin(dist, axis=1)


def test_first_neighbours_follow_the_tie_rule_whatever_the_search_rounding(monkeypatch):
    """A search whose similarities differ from the exact ones in the last float32 bits (another
    CPU's BLAS kernel) must not change the result: duplicates go to the lowest index."""
    x = with_duplicates(27)
    expected = rule_first_neighbours(x)
    rng = np.random.default_rng(0)
    real = neighbours_module._faiss_exact_topk

    def jittered(xn, k, rows=None):  # faiss's output, each similarity moved by 0-2 ulps
        sims, idx = real(xn, k, rows)
        sims = sims + rng.integers(-2, 3, sims.shape) * np.spacing(sims)
        order = np.argsort(-sims, axis=1, kind="stable")
        return np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)

    monkeypatch.setattr(neighbours_module, "_faiss_exact_topk", jittered)
    for data in (x, x.astype(np.float64)):
        np.testing.assert_array_equal(first_neighbours(data)[0], expected)


_KERNEL_SCRIPT = """
import sys; import numpy as np
sys.path.insert(0, {tests!r})
from test_clustering import with_duplicates
from vidssl.clustering import first_neighbours
x = with_duplicates(27)
np.save(sys.argv[1], np.stack([first_neighbours(x, prune_min_points=0, prune_max_share=1.0)[0],
                               first_neighbours(x)[0]]))
"""


@pytest.mark.skipif(
    sys.platform != "linux" or "avx2" not in open("/proc/cpuinfo").read(),
    reason="needs an x86-64 CPU with AVX2 to switch BLAS and faiss kernels",
)
def test_first_neighbours_equal_under_other_blas_and_faiss_kernels(tmp_path):
    """Pruned and brute-force search give the rule's answer with OpenBLAS's and faiss's kernels
    of older CPUs (AVX2 and SSE: another summation order than AVX-512)."""
    import os
    import subprocess

    expected = rule_first_neighbours(with_duplicates(27))
    script = _KERNEL_SCRIPT.format(tests=os.path.dirname(__file__))
    for blas, faiss_level in [("Haswell", "avx2"), ("Prescott", "generic")]:
        out = tmp_path / f"{blas}.npy"
        env = {**os.environ, "OPENBLAS_CORETYPE": blas, "FAISS_OPT_LEVEL": faiss_level}
        subprocess.run([sys.executable, "-c", script, str(out)], env=env, check=True,
                       timeout=120)
        pruned, brute = np.load(out)
        np.testing.assert_array_equal(pruned, expected, err_msg=blas)
        np.testing.assert_array_equal(brute, expected, err_msg=blas)


def _ddp_worker(rank, world, port, x, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        res = finch(x, device="cpu", distributed=True, chunk_size=128)
        queue.put((rank, res.partitions))
        dist.barrier()  # leave together (see tests/test_ddp_methods.py)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_finch_distributed_two_gloo_ranks_equal_single_process():
    import socket

    import torch.multiprocessing as mp

    x, _ = blobs(801, 16, 8, 9)  # odd N: the last rank's slice is padded
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, x, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    expected = finch(x).partitions
    np.testing.assert_array_equal(results[0], expected)
    np.testing.assert_array_equal(results[1], expected)


def test_recall_and_approximate_indexes():
    x, _ = blobs(3000, 16, 30, 10)
    exact, _ = first_neighbours(x)
    assert first_neighbour_recall(x, exact, sample=500) == 1.0
    wrong = exact.copy()
    wrong[::2] = (wrong[::2] + 1) % len(x)
    assert 0.4 < first_neighbour_recall(x, wrong, sample=1500) < 0.6
    for method in ("ivf", "hnsw"):
        res = finch(x, neighbours=method, approx_min_points=1000, recall_sample=500)
        assert res.first_neighbour_recall >= 0.95, method
        assert res.diagnostics["first_neighbour_recall"] == res.first_neighbour_recall
    assert finch(x).first_neighbour_recall is None


# --- other methods and the entry point ------------------------------------------------------------


def test_agglomerative_matches_scikit_learn():
    from sklearn.cluster import AgglomerativeClustering

    x, _ = blobs(400, 8, 5, 11, spread=0.8)
    for linkage, metric in [("average", "cosine"), ("ward", "euclidean")]:
        labels, diag = agglomerative(x, num_clusters=5, linkage=linkage, metric=metric)
        ref = AgglomerativeClustering(5, linkage=linkage, metric=metric).fit_predict(x)
        assert adjusted_rand_index(ref, labels) == 1.0
    labels, _ = agglomerative(x, distance_threshold=0.3)
    ref = AgglomerativeClustering(None, linkage="average", metric="cosine",
                                  distance_threshold=0.3).fit_predict(x)
    assert adjusted_rand_index(ref, labels) == 1.0


def test_agglomerative_refuses_before_running_out_of_memory():
    with pytest.raises(MemoryError, match="GiB"):
        agglomerative(np.zeros((200_000, 4), dtype=np.float32), num_clusters=3)  # ~300 GiB
    with pytest.raises(MemoryError, match="max_memory_gb"):
        agglomerative(np.zeros((2000, 4)), num_clusters=3, max_memory_gb=0.001)
    with pytest.raises(ValueError, match="exactly one"):
        agglomerative(np.zeros((20, 4)))
    with pytest.raises(ValueError, match="average, ward"):
        agglomerative(np.zeros((20, 4)), num_clusters=2, linkage="centroid")


def test_kmeans_recovers_separated_blobs_reproducibly():
    x, truth = blobs(1000, 16, 4, 12, spread=0.1)
    labels, diag = kmeans(x, 4, nredo=2)
    assert adjusted_rand_index(truth, labels) == 1.0
    np.testing.assert_array_equal(labels, kmeans(x, 4, nredo=2)[0])
    assert np.isfinite(diag["objective"])
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(x, 0)


def test_cluster_entry_point():
    x, truth = blobs(1000, 16, 6, 13, spread=0.2)
    res = cluster(x, "finch", truth=truth, req_clust=6)
    assert res.diagnostics["num_clusters"] == 6 and res.diagnostics["ari"] == 1.0
    assert res.levels is not None and res.levels.shape[0] == 1000
    res = cluster(x, level=-1)
    np.testing.assert_array_equal(res.labels, res.levels[:, -1])
    assert "nmi" not in res.diagnostics
    partial = truth.copy()
    partial[:500] = -1  # unknown ground truth is left out of the scores
    res = cluster(x, "kmeans", truth=partial, num_clusters=6)
    assert res.diagnostics["labelled"] == 500 and res.num_clusters == [6]
    assert cluster(x, "agglomerative", num_clusters=6).num_clusters == [6]
    with pytest.raises(ValueError, match="finch, agglomerative, kmeans"):
        cluster(x, "dbscan")
    with pytest.raises(ValueError, match="level"):
        cluster(x, level=50)


# --- metrics --------------------------------------------------------------------------------------


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(14)
    for n in (2, 10, 500):
        a = rng.integers(0, 6, n)
        b = np.where(rng.random(n) < 0.5, a, rng.integers(0, 9, n))
        assert adjusted_rand_index(a, b) == pytest.approx(sklearn_metrics.adjusted_rand_score(a, b))
        assert normalized_mutual_info(a, b) == pytest.approx(
            sklearn_metrics.normalized_mutual_info_score(a, b))
        assert adjusted_mutual_info(a, b) == pytest.approx(
            sklearn_metrics.adjusted_mutual_info_score(a, b))
        assert homogeneity(a, b) == pytest.approx(sklearn_metrics.homogeneity_score(a, b))
    assert adjusted_rand_index([0, 0, 1], [5, 5, 7]) == 1.0
    assert normalized_mutual_info([3, 3], [1, 1]) == sklearn_metrics.normalized_mutual_info_score(
        [3, 3], [1, 1])
    assert homogeneity([3, 3], [1, 2]) == 1.0
    # Over-clustering: 6 equal classes in 46 pure clusters. Homogeneity sees pure clusters; NMI
    # is capped near 0.64 (the figure quoted in docs/pseudo_labels.md).
    truth = np.repeat(np.arange(6), 28)
    per_class = [8, 8, 8, 8, 8, 6]  # clusters per class, 46 in all, each inside one class
    pure = np.concatenate([sum(per_class[:c]) + np.arange(28) % k for c, k in enumerate(per_class)])
    assert len(np.unique(pure)) == 46
    assert homogeneity(truth, pure) == 1.0
    assert 0.62 < normalized_mutual_info(truth, pure) < 0.66


def test_ari_at_large_n_against_exact_integer_pair_counts():
    n = 1_000_000  # C(n, 2) * C(n, 2) ~ 2.5e23 overflows int64 products
    rng = np.random.default_rng(15)
    a = rng.integers(0, 3, n)
    b = np.where(rng.random(n) < 0.7, a, rng.integers(0, 4, n))
    cells = np.unique(a * 4 + b, return_counts=True)[1]
    index = sum(comb(int(c), 2) for c in cells)
    sa = sum(comb(int(c), 2) for c in np.bincount(a))
    sb = sum(comb(int(c), 2) for c in np.bincount(b))
    # Exact integer pair counts (Python ints): ARI = (C*index - sa*sb) / (C*(sa+sb)/2 - sa*sb)
    total = comb(n, 2)
    expected = (total * index - sa * sb) / (total * (sa + sb) / 2 - sa * sb)
    assert adjusted_rand_index(a, b) == pytest.approx(expected, rel=1e-12)


def test_cluster_stats_and_metrics_dict():
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    assert cluster_stats(labels) == {"num_clusters": 4, "size_min": 1, "size_median": 2.5,
                                     "size_max": 4, "singletons": 1}
    out = clustering_metrics(labels, labels + 10, ami=False)
    assert out["nmi"] == pytest.approx(1.0) and out["ari"] == 1.0 and "ami" not in out
    with pytest.raises(ValueError, match="length"):
        clustering_metrics(labels, labels[:3])
