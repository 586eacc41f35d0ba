"""First-neighbour search under cosine distance, without an N x N matrix.

Exact search uses faiss ``IndexFlatIP`` on the CPU or chunked matrix products in torch (one slice
of the bank per DDP rank); IVF and HNSW indexes are an explicit opt-in for CPU-only scale.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Optional, Tuple

import numpy as np

log = logging.getLogger(__name__)

#: Valid values of ``neighbours=``: exact search, or an approximate faiss index (opt-in).
NEIGHBOUR_METHODS = ("exact", "ivf", "hnsw")

# Candidates fetched per query: self, the first neighbour and a few runners-up, so that ties
# (duplicates, or similarities that round to the same float32 distance) can be broken by the
# lowest index as finch-clust's ``np.argmin`` over a dense distance row does.
_DEFAULT_K = 4
_MAX_K = 1024


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise the rows of ``x`` (``N x D``) exactly as scikit-learn's ``normalize`` does.

    Zero rows stay zero (their norm is taken as 1), like ``sklearn.preprocessing.normalize``,
    which finch-clust's cosine distances go through; the dtype of ``x`` is kept.
    """
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0.0] = 1.0
    return x / norms[:, None]


def _rank_rows(n: int, rank: int, world_size: int) -> Tuple[int, int, int]:
    """Rows ``[start, stop)`` of an ``n``-row bank that ``rank`` searches, and the padded size.

    Every rank gets ``ceil(n / world_size)`` rows (the last ones fewer, possibly none), so the
    per-rank results can be padded to one size and joined with a fixed-size ``all_gather``.
    """
    per_rank = -(-n // world_size)
    start = min(n, rank * per_rank)
    return start, min(n, start + per_rank), per_rank


@contextlib.contextmanager
def _ieee_float32(device_type: str):
    """Run float32 matrix products in IEEE float32 on ``device_type``, then restore the setting.

    ``torch.set_float32_matmul_precision("high")`` (TF32 on CUDA) or ``"medium"`` (bf16 on CPUs
    with oneDNN) makes products err far beyond the float32 bound that :func:`_search_error`
    gives the re-search test, so a nearer row could hide behind a candidate list; exact search
    turns them off for its own products only.
    """
    import torch

    if device_type == "cuda":
        knob = torch.backends.cuda.matmul
    else:
        knob = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if knob is not None and hasattr(knob, "fp32_precision"):  # torch >= 2.9
        old, attr, value = knob.fp32_precision, "fp32_precision", "ieee"
    elif device_type == "cuda":
        old, attr, value = knob.allow_tf32, "allow_tf32", False
    else:
        yield
        return
    setattr(knob, attr, value)
    try:
        yield
    finally:
        setattr(knob, attr, old)


def _torch_topk_rows(
    xn: np.ndarray,
    start: int,
    stop: int,
    k: int,
    device: Any,
    chunk_size: int,
    rows: Optional[np.ndarray] = None,
) -> Tuple[Any, Any]:
    """Top-``k`` inner products of rows ``[start, stop)`` (or ``rows``) against the bank, in torch.

    The products run in IEEE float32 whatever the global matmul precision (:func:`_ieee_float32`).
    """
    import torch

    bank = torch.from_numpy(np.ascontiguousarray(xn, dtype=np.float32)).to(device)
    queries = np.arange(start, stop) if rows is None else np.asarray(rows, dtype=np.int64)
    sims, idx = [], []
    with _ieee_float32(bank.device.type):
        for lo in range(0, len(queries), chunk_size):
            chunk = queries[lo : lo + chunk_size]
            q = (
                bank[int(chunk[0]) : int(chunk[-1]) + 1]
                if rows is None
                else bank[torch.from_numpy(chunk).to(bank.device)]
            )
            s, i = torch.topk(q @ bank.T, k, dim=1)
            sims.append(s)
            idx.append(i)
    if not sims:  # this rank has no rows (more ranks than rows)
        return (
            torch.empty(0, k, device=bank.device),
            torch.empty(0, k, dtype=torch.long, device=bank.device),
        )
    return torch.cat(sims), torch.cat(idx)


def _torch_topk(
    xn: np.ndarray, k: int, device: Any, chunk_size: int, distributed: bool
) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by chunked matrix products; under DDP each rank searches its own slice.

    With ``distributed=True`` every rank of the default process group must call this with the
    same bank: rank ``r`` searches rows ``_rank_rows(n, r, world_size)`` against the whole bank,
    then a fixed-size padded ``all_gather`` gives every rank all ``n`` results.
    """
    import torch
    import torch.distributed as dist

    from vidssl.distributed import rank_and_world

    n = xn.shape[0]
    rank, world = rank_and_world() if distributed else (0, 1)
    start, stop, per_rank = _rank_rows(n, rank, world)
    sims, idx = _torch_topk_rows(xn, start, stop, k, device, chunk_size)
    if world > 1:
        pad = per_rank - (stop - start)
        sims = torch.cat([sims, sims.new_zeros(pad, k)])
        idx = torch.cat([idx, idx.new_zeros(pad, k)])
        all_sims = [torch.empty_like(sims) for _ in range(world)]
        all_idx = [torch.empty_like(idx) for _ in range(world)]
        dist.all_gather(all_sims, sims)
        dist.all_gather(all_idx, idx)
        sims, idx = torch.cat(all_sims)[:n], torch.cat(all_idx)[:n]
    return sims.float().cpu().numpy(), idx.cpu().numpy().astype(np.int64)


def _faiss_exact_topk(xn: np.ndarray, k: int, rows: Optional[np.ndarray] = None):
    """Exact top-``k`` inner products with faiss ``IndexFlatIP`` (queries: ``rows`` or all)."""
    import faiss

    index = faiss.IndexFlatIP(xn.shape[1])
    index.add(xn)
    queries = xn if rows is None else xn[rows]
    sims, idx = index.search(queries, k)
    return sims, idx.astype(np.int64)


# --- exact top-k with certified pruning ---------------------------------------------------------

#: Banks with fewer rows are searched by brute force (one faiss product is cheap there).
PRUNE_MIN_POINTS = 10_000
#: Largest share of the N x N products the pruned search may need before brute force is used
#: (its block products, gathers included, run at about 0.3-0.4x the speed of faiss's brute force
#: per product: on 2 cores it broke even at shares of 0.25-0.37 at 20k x 128 and 20k x 512).
PRUNE_MAX_SHARE = 0.2
_PRUNE_BLOCK = 256  # query rows per block (a cluster, or a slice of a large one)
_PRUNE_COLUMNS = 8192  # bank rows per matrix product inside a block (bounds the memory)
_PRUNE_ROWS_PER_CLUSTER = 80
_KMEANS_ITER = 4
_KMEANS_SAMPLE = 16  # training points per centroid


def _float32_dot_error(d: int) -> float:
    """Bound on ``|fl(x . y) - x . y| / (|x| |y|)`` for float32 vectors of length ``d``.

    The classic bound ``gamma_d = d u / (1 - d u)``, ``u = 2^-24``, holds for any summation order
    (BLAS blocking, FMA, several accumulators), so for faiss's and numpy's products alike.
    """
    du = d * 2.0**-24
    return du / (1.0 - du)


def _row_norms64(x: np.ndarray, step: int = 2048) -> np.ndarray:
    """Euclidean norms of the rows of ``x`` computed in float64, a chunk of rows at a time."""
    out = np.empty(x.shape[0], dtype=np.float64)
    for lo in range(0, x.shape[0], step):
        c = x[lo : lo + step].astype(np.float64)
        out[lo : lo + step] = np.sqrt(np.einsum("ij,ij->i", c, c))
    return out


def _spherical_partition(xn: np.ndarray, num_clusters: int, seed: int) -> np.ndarray:
    """Centroids of a cheap spherical k-means on a sample of ``xn`` (``K x D`` float32).

    Only the speed of the pruned search depends on them, never its result.
    """
    import faiss

    n, d = xn.shape
    rng = np.random.default_rng(seed)
    sample = xn[np.sort(rng.choice(n, size=min(n, _KMEANS_SAMPLE * num_clusters), replace=False))]
    km = faiss.Kmeans(
        d, num_clusters, niter=_KMEANS_ITER, spherical=True, seed=seed, verbose=False,
        min_points_per_centroid=1, max_points_per_centroid=_KMEANS_SAMPLE,
    )
    km.train(np.ascontiguousarray(sample))
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def _block_topk(
    xn: np.ndarray, queries: np.ndarray, bank: np.ndarray, k: int, floor: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products of rows ``queries`` among rows ``bank`` of ``xn``.

    Only products ``>= floor`` (one value per query) are ranked: the caller guarantees at least
    ``k`` of them per query, which keeps the ranking to a few entries per row instead of a
    partial sort of the whole block. Returns float32 similarities (descending, ties by index)
    and int64 row indices of ``xn``.
    """
    q = xn[queries]
    rows, cols, vals = [], [], []
    for lo in range(0, len(bank), _PRUNE_COLUMNS):
        ids = bank[lo : lo + _PRUNE_COLUMNS]
        prod = q @ xn[ids].T
        width = -(-len(ids) // 8) * 8
        hit = np.zeros((len(queries), width), dtype=bool)
        np.greater_equal(prod, floor[:, None], out=hit[:, : len(ids)])
        # Hits are few (about k per row), and np.nonzero over every entry costs more than the
        # product at small D: find the 8-byte words that hold a hit, then their bytes.
        words = np.flatnonzero(hit.view(np.uint64))
        flat = (words[:, None] * 8 + np.arange(8)).ravel()
        flat = flat[hit.ravel()[flat]]
        r, c = np.divmod(flat, width)
        rows.append(r)
        cols.append(ids[c])
        vals.append(prod[r, c])
    r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    order = np.lexsort((c, -v, r))  # by query, then similarity descending, then index
    r, c, v = r[order], c[order], v[order]
    start = np.searchsorted(r, np.arange(len(queries)))
    if np.any(np.diff(np.append(start, len(r))) < k):
        raise AssertionError("pruned search: fewer than k candidates above the floor")
    take = start[:, None] + np.arange(k)
    return v[take], c[take].astype(np.int64)


def _pruned_exact_topk(
    xn: np.ndarray,
    k: int,
    *,
    max_share: float = PRUNE_MAX_SHARE,
    num_clusters: Optional[int] = None,
    seed: int = 0,
) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], dict]:
    """Exact top-``k`` inner products of the unit rows ``xn`` with each other, pruned by clusters.

    The rows are split by a cheap spherical k-means; each cluster ``c`` gets its angular radius
    ``r_c`` (the largest angle between its centroid and an actual member). A block of queries
    first searches its own cluster (plus the nearest clusters if that holds fewer than ``k``
    rows), which gives each query ``x`` a ``k``-th best similarity ``t_x``. By the triangle
    inequality on the sphere, every member ``y`` of ``c`` has ``angle(x, y) >= angle(x, c) -
    r_c``, so a cluster with ``angle(x, c) - r_c > arccos(t_x - margin)`` for every query of the
    block cannot hold any of their top ``k`` and is skipped; the rest are searched exactly.
    ``margin`` covers float32 rounding of every product involved (see below), so the result is
    the exact top-``k`` of the whole bank, whatever the k-means quality.

    When the bounds leave more than ``max_share`` of the ``N x N`` products to do, returns
    ``(None, None, info)`` and the caller searches by brute force. ``info`` holds ``path``,
    ``share`` (products the pruned search does or would do, as a share of ``N x N``),
    ``clusters`` and ``margin``.
    """
    n, d = xn.shape
    info: dict = {"path": "brute", "share": None, "clusters": 0, "margin": None}
    norms = _row_norms64(xn)
    # Rows must be unit vectors up to rounding (angles of zero rows are undefined).
    delta = float(np.abs(norms - 1.0).max()) if n else 0.0
    if not delta <= 1e-3:  # also NaN
        info["reason"] = "rows not normalised"
        return None, None, info
    # About _PRUNE_ROWS_PER_CLUSTER rows per cluster (small clusters prune finely, and still make
    # matrix products of reasonable size), at least 2 sqrt(N). The k-means and the N x K
    # products to the centroids then cost about 1/80 of brute force's N^2 D; capping K at
    # 4 sqrt(N) instead left 2.5 blobs per cluster at 1M rows and nothing to prune.
    root = math.sqrt(n)
    num = num_clusters or int(max(2 * root, n / _PRUNE_ROWS_PER_CLUSTER))
    num = max(1, min(num, n // 8))
    t0 = time.perf_counter()
    cent = _spherical_partition(xn, num, seed)
    info["kmeans_seconds"] = time.perf_counter() - t0
    cnorm = _row_norms64(cent)
    if not np.all(cnorm > 0.5):  # faiss normalises spherical centroids; never trust a NaN
        info["reason"] = "degenerate centroids"
        return None, None, info
    gamma = _float32_dot_error(d)
    # Margin on the k-th best similarity t_x. With e = gamma (1 + delta)^2 the float32 error of
    # one product of two rows, and 2 delta + delta^2 the gap between a product and the cosine of
    # the angle: a pruned y has cos(x, y) < t_x - margin, so its true product is < t_x - 3e
    # (delta <= 1e-3), its computed one (ours or faiss's) < t_x - 2e, below the computed one of each
    # of the k candidates behind t_x (>= t_x - 2e). So brute force would not rank it in the top k
    # either. 1e-9 covers float64 rounding in the angles.
    e = gamma * (1.0 + delta) ** 2
    margin = 3.0 * e + 3.0 * delta + 1e-9
    info.update(clusters=num, margin=margin)

    # Assignment to the highest-inner-product centroid, and each cluster's angular radius from
    # its actual members, in float64 (minus a slack that can only make the radius larger).
    assign = np.empty(n, dtype=np.int64)
    step = max(1, 2**20 // max(1, num))
    for lo in range(0, n, step):
        assign[lo : lo + step] = np.argmax(xn[lo : lo + step] @ cent.T, axis=1)
    radius = np.zeros(num, dtype=np.float64)
    cent64 = cent.astype(np.float64)
    for lo in range(0, n, 2048):
        a = assign[lo : lo + 2048]
        cos = np.einsum("ij,ij->i", xn[lo : lo + 2048].astype(np.float64), cent64[a])
        cos = cos / (norms[lo : lo + 2048] * cnorm[a]) - 1e-12
        np.maximum.at(radius, a, np.arccos(np.clip(cos, -1.0, 1.0)))
    if not np.all(np.isfinite(radius)):
        info["reason"] = "non-finite radius"
        return None, None, info
    # Centroids extended by two columns, cos(r_c) |c| and sin(r_c) |c|, for the test below.
    cent_ext = np.concatenate(
        [cent, (np.cos(radius) * cnorm)[:, None], (np.sin(radius) * cnorm)[:, None]], axis=1
    ).astype(np.float32)
    # A float32 product of d + 2 terms is within gamma_{d+2} times the sum of the terms'
    # magnitudes, at most 3 |x| |c|, of its exact value; 1e-6 covers rounding the factors
    # cos(phi) |x|, sin(phi) |x|, cos(r) |c|, sin(r) |c| (< 6e-8 each) to float32.
    slack = np.float32(3.0 * _float32_dot_error(d + 2) * (1.0 + delta) * cnorm.max() + 1e-6)
    order = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[order], np.arange(num + 1))
    sizes = np.diff(bounds)
    members = [order[bounds[c] : bounds[c + 1]] for c in range(num)]

    # Plan: per block, its first candidate clusters, its t_x, and the clusters it must search.
    plan = []
    work = planned = 0
    # Clusters in a random order, so that the work planned so far extrapolates to the whole
    # bank: planning stops as soon as the pruned search clearly would not pay.
    for c in np.random.default_rng(seed).permutation(num):
        if sizes[c] == 0:
            continue
        if work > max_share * n * n or (
            planned >= n // 8 and work * n / planned > 2 * max_share * n * n
        ):
            info["share"] = work / planned / n
            info["share_estimated"] = True
            info["plan_only_seconds"] = time.perf_counter() - t0
            return None, None, info
        first = [c]
        total = sizes[c]
        if total < k:  # too few rows of its own: add the clusters nearest to its centroid
            for other in np.argsort(-(cent @ cent[c]), kind="stable"):
                if total >= k:
                    break
                if other != c and sizes[other]:
                    first.append(int(other))
                    total += sizes[other]
        first_rows = np.concatenate([members[j] for j in first])
        for lo in range(0, sizes[c], _PRUNE_BLOCK):
            queries = members[c][lo : lo + _PRUNE_BLOCK]
            prod = xn[queries] @ xn[first_rows].T
            kth = -np.partition(-prod, k - 1, axis=1)[:, k - 1].astype(np.float64)
            # Cluster c may hold a top-k row of x iff angle(x, c) <= phi_x + r_c, i.e.
            # cos(x, c) >= cos(phi_x + r_c) = cos(phi) cos(r) - sin(phi) sin(r) while
            # phi_x + r_c <= pi (always kept beyond). With the norms folded in, that is
            # x . c - cos(phi) |x| cos(r) |c| + sin(phi) |x| sin(r) |c| >= 0: one float32
            # product of the queries extended by [-cos(phi) |x|, sin(phi) |x|] with `cent_ext`,
            # kept when it is >= -slack (its rounding error bound).
            cos_phi = np.clip(kth - margin, -1.0, 1.0)
            qn = norms[queries]
            q_ext = np.empty((len(queries), d + 2), dtype=np.float32)
            q_ext[:, :d] = xn[queries]
            q_ext[:, d] = -cos_phi * qn
            q_ext[:, d + 1] = np.sqrt(1.0 - cos_phi**2) * qn
            keep = (q_ext @ cent_ext.T >= -slack).any(axis=0)
            keep |= np.arccos(cos_phi).max() >= np.pi - radius - 1e-9
            keep[first] = True
            keep &= sizes > 0
            searched = np.flatnonzero(keep)
            plan.append((queries, searched, kth))
            work += len(queries) * int(sizes[searched].sum())
            planned += len(queries)
    share = work / float(n) ** 2
    info["plan_only_seconds"] = time.perf_counter() - t0
    info["share"] = share
    if share > max_share:
        return None, None, info
    sims = np.empty((n, k), dtype=np.float32)
    idx = np.empty((n, k), dtype=np.int64)
    for queries, searched, kth in plan:
        bank = np.concatenate([members[c] for c in searched])
        # Floor 2e below t_x: keeps the k candidates behind t_x whatever the rounding of this
        # product, and everything that can rank above them.
        floor = np.nextafter((kth - 2.0 * e).astype(np.float32), np.float32(-np.inf))
        sims[queries], idx[queries] = _block_topk(xn, queries, bank, k, floor)
    info["path"] = "pruned"
    info["search_seconds"] = time.perf_counter() - t0 - info["plan_only_seconds"]
    return sims, idx, info


def exact_topk(
    xn: np.ndarray,
    k: int,
    *,
    prune_min_points: Optional[int] = None,
    prune_max_share: Optional[float] = None,
) -> Tuple[np.ndarray, np.ndarray, dict]:
    """Exact top-``k`` inner products among the unit rows ``xn``: pruned search or brute force.

    Banks of at least ``prune_min_points`` rows (default :data:`PRUNE_MIN_POINTS`) try
    :func:`_pruned_exact_topk`, which falls back to faiss brute force when its bounds leave more
    than ``prune_max_share`` (default :data:`PRUNE_MAX_SHARE`) of the products to do. Same
    contract as faiss: float32 similarities in descending order, int64 indices, each row
    itself among its candidates. Returns ``(sims, idx, info)``, ``info["path"]`` being
    ``"pruned"`` or ``"brute"``.
    """
    min_points = PRUNE_MIN_POINTS if prune_min_points is None else prune_min_points
    max_share = PRUNE_MAX_SHARE if prune_max_share is None else prune_max_share
    n = xn.shape[0]
    info: dict = {"path": "brute", "share": None}
    if n >= max(min_points, 2 * k):
        t0 = time.perf_counter()
        sims, idx, info = _pruned_exact_topk(xn, k, max_share=max_share)
        info["plan_seconds"] = time.perf_counter() - t0
        if sims is not None:
            log.debug("exact top-%d of %d rows: pruned search, %.3f of the N x N products, "
                      "%d clusters, %.2fs", k, n, info["share"], info["clusters"],
                      info["plan_seconds"])
            return sims, idx, info
        share = "?" if info["share"] is None else f"{info['share']:.3f}"
        log.debug("exact top-%d of %d rows: brute force (pruned share would be %s, limit %.2f;"
                  " deciding took %.2fs)", k, n, share, max_share, info["plan_seconds"])
    sims, idx = _faiss_exact_topk(xn, k)
    return sims, idx, info


def build_approximate_index(
    xn: np.ndarray,
    method: str,
    *,
    ivf_nlist: Optional[int] = None,
    ivf_nprobe: int = 16,
    hnsw_m: int = 32,
    hnsw_ef_construction: int = 80,
    hnsw_ef_search: int = 64,
    seed: int = 0,
):
    """Build a faiss IVF-Flat or HNSW-Flat inner-product index over normalised ``xn``.

    IVF: ``ivf_nlist`` cells (default ``4 * sqrt(N)``, the faiss wiki's 4-16 x sqrt(N) rule),
    trained on at most ``64 * nlist`` sampled points, searched with ``ivf_nprobe`` cells. HNSW:
    ``hnsw_m`` links per node (faiss wiki: 4-64), ``efConstruction``/``efSearch`` as given.
    Vectors are stored uncompressed (Flat), so recall is limited only by the cells/graph visited.
    """
    import faiss

    n, d = xn.shape
    if method == "ivf":
        nlist = ivf_nlist or max(1, min(n // 39, int(4 * math.sqrt(n))))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = xn[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))]
        index.train(train)
        index.add(xn)
        index.nprobe = min(nlist, ivf_nprobe)
        return index
    if method == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = hnsw_ef_construction
        index.add(xn)
        index.hnsw.efSearch = hnsw_ef_search
        return index
    raise ValueError(f"unknown approximate index {method!r}; choose one of 'ivf', 'hnsw'")


def _search_error(d: int) -> float:
    """Bound on ``|s - p|`` for a float32 search similarity ``s`` of two stored unit rows.

    ``p`` is the exact product of the rows as stored (float32, or the float64 rows of a float64
    input, of which the search sees the float32 rounding: ``4 u`` covers that). ``gamma_d``
    (see :func:`_float32_dot_error`) holds for any summation order, hence for faiss, numpy's
    BLAS and torch alike, on every CPU; 1 % covers rows whose norm is 1 only up to rounding.
    """
    return 1.01 * _float32_dot_error(d) + 4 * 2.0**-24


def _candidate_distances(
    x_ref: np.ndarray, idx: np.ndarray, row_ids: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """Cosine distances of the candidates ``idx`` of rows ``row_ids``, computed portably.

    Each product is summed in float64 by numpy's pairwise summation over the feature axis, whose
    order depends only on ``D`` (not on the CPU's vector width, the BLAS kernel or the memory
    layout), then the distance ``clip(1 - p, 0, 2)`` is rounded to float32. Equal rows therefore
    get bit-equal distances on every machine, and the tie rule (lowest index) decides between
    them. For float32 rows the products are exact before summation. Returns ``(dist, sim)``:
    float32 distances and float64 similarities, both ``rows x k``.
    """
    sim = np.empty(idx.shape, dtype=np.float64)
    safe = np.where(idx < 0, 0, idx)
    step = max(1, 2**22 // max(1, idx.shape[1] * x_ref.shape[1]))
    for lo in range(0, len(row_ids), step):
        hi = min(len(row_ids), lo + step)
        a = x_ref[row_ids[lo:hi]].astype(np.float64)[:, None, :]
        b = x_ref[safe[lo:hi]].astype(np.float64)
        # np.multiply + sum, not einsum or matmul: their summation order follows the SIMD width.
        sim[lo:hi] = np.multiply(a, b).sum(axis=-1)
    dist = np.clip(1.0 - sim, 0.0, 2.0).astype(np.float32)
    return dist, sim


def _pick_first(
    sims: np.ndarray, idx: np.ndarray, row_ids: np.ndarray, x_ref: np.ndarray
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First neighbour of each row among its search candidates: least distance, lowest index.

    ``sims`` (float32, descending) and ``idx`` are a top-``k`` search's output for rows
    ``row_ids``; the candidates' distances are recomputed by :func:`_candidate_distances`, so the
    choice never depends on the search's floating-point order. Self and missing (-1) candidates
    are skipped. Returns the neighbours, their distances, and a mask of rows whose list may be
    incomplete: a row outside the list has a search similarity at most the list's last one,
    ``sims[:, -1]``, so its exact one is at most that plus :func:`_search_error`; when this can
    reach the best candidate's (less a float32 ulp of the distance, within which two distances
    round to the same value and tie), the row must be searched again with a longer list.
    """
    dist, sim = _candidate_distances(x_ref, idx, row_ids)
    skip = (idx == row_ids[:, None]) | (idx < 0)
    dist = np.where(skip, np.inf, dist).astype(np.float32)
    best = dist.min(axis=1)
    tied = dist == best[:, None]
    nn = np.where(tied, idx, np.iinfo(np.int64).max).min(axis=1)
    best_sim = np.where(skip, -np.inf, sim).max(axis=1)
    reach = sims[:, -1].astype(np.float64) + _search_error(x_ref.shape[1]) + 2.0**-22
    incomplete = (reach >= best_sim) & ~(idx < 0).any(axis=1)
    return nn, best, incomplete


def first_neighbours(
    x: np.ndarray,
    *,
    neighbours: str = "exact",
    device: Any = None,
    distributed: bool = False,
    chunk_size: int = 4096,
    approx_min_points: int = 20_000,
    index_kwargs: Optional[dict] = None,
    prune_min_points: Optional[int] = None,
    prune_max_share: Optional[float] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """First neighbour (nearest other row under cosine distance) of every row of ``x``.

    Args:
        x: ``N x D`` features, float32 or float64 (not necessarily normalised). The search
            runs on float32 rows; the candidates' distances are then recomputed from the rows
            as given (float64 sums, rounded to float32), as finch-clust does for the cluster
            means above level 0.
        neighbours: ``"exact"`` (default), or an approximate faiss index, ``"ivf"`` or
            ``"hnsw"``, for CPU-only scale (check :func:`first_neighbour_recall`).
        device: ``None`` for faiss on the CPU; a torch device (``"cuda"``, ``"cuda:1"``, ``"cpu"``)
            for exact chunked matrix products in torch, in IEEE float32 whatever the global
            matmul precision (TF32 would void the exactness test); rows that need a longer
            candidate list are searched again on that device too, so faiss is not needed.
        distributed: with a torch ``device`` and an initialised process group, every rank
            searches its own slice of the rows and the results are all-gathered; then EVERY rank
            must call this with the same ``x``.
        chunk_size: query rows per matrix product on the torch path (memory ``chunk_size x N``).
        approx_min_points: banks smaller than this are searched exactly even when ``neighbours``
            asks for an approximate index (exact search is cheap there).
        index_kwargs: keyword arguments of :func:`build_approximate_index`.
        prune_min_points: exact CPU search (``device=None``) of banks of at least this many
            rows (default :data:`PRUNE_MIN_POINTS`) skips clusters of rows that provably hold
            no top candidate (see :func:`exact_topk`); the result is exact either way.
        prune_max_share: the pruned search is used only when it leaves at most this share of
            the ``N x N`` products to do (default :data:`PRUNE_MAX_SHARE`); else brute force.

    Returns:
        ``(nn, dist)``: ``int64 N`` first-neighbour indices and their float32 cosine distances.
        The rule, the same on every CPU and search path: the least distance as computed by
        :func:`_candidate_distances` (float64 sums in a fixed order, rounded to float32), ties
        to the lowest index (like ``np.argmin`` over a distance row). Exact search re-searches
        any row whose candidate list could hide a tie within its float32 rounding error, so the
        floating-point order of faiss, BLAS or the pruned search never decides. A row never is
        its own neighbour unless ``N == 1``.
    """
    if neighbours not in NEIGHBOUR_METHODS:
        valid = ", ".join(NEIGHBOUR_METHODS)
        raise ValueError(f"unknown neighbours={neighbours!r}; valid: {valid}")
    n = x.shape[0]
    if n == 1:
        return np.zeros(1, dtype=np.int64), np.full(1, np.inf, dtype=np.float32)
    xn_ref = normalize_rows(x)
    xn = np.ascontiguousarray(xn_ref, dtype=np.float32)
    row_ids = np.arange(n)
    k = min(n, _DEFAULT_K)
    approx = neighbours != "exact" and n >= approx_min_points
    t0 = time.perf_counter()
    if approx:
        index = build_approximate_index(xn, neighbours, **(index_kwargs or {}))
        sims, idx = index.search(xn, k)
        idx = idx.astype(np.int64)
    elif device is not None:
        sims, idx = _torch_topk(xn, k, device, chunk_size, distributed)
    else:
        sims, idx, _ = exact_topk(
            xn, k, prune_min_points=prune_min_points, prune_max_share=prune_max_share
        )
    nn, best, incomplete = _pick_first(sims, idx, row_ids, xn_ref)
    incomplete &= k < n  # every row was a candidate: nothing lies beyond the list
    # Exact search only: rows whose list may hide a tie or a nearer row (duplicates, or
    # similarities within the search's rounding error of the k-th) are searched again with a
    # longer list, so the result is the lowest index at the least portable distance.
    while not approx and incomplete.any() and k < min(n, _MAX_K):
        k = min(n, _MAX_K, 4 * k)
        rows = np.flatnonzero(incomplete)
        if device is not None and not approx:
            # The torch path re-searches on its own device: no faiss, no bank copy to the CPU.
            s2, i2 = _torch_topk_rows(xn, 0, 0, k, device, chunk_size, rows=rows)
            s2, i2 = s2.float().cpu().numpy(), i2.cpu().numpy().astype(np.int64)
        else:
            s2, i2 = _faiss_exact_topk(xn, k, rows)
        nn2, best2, inc2 = _pick_first(s2, i2, rows, xn_ref)
        nn[rows], best[rows] = nn2, best2
        incomplete = np.zeros(n, dtype=bool)
        incomplete[rows[inc2]] = k < n
    if not approx and incomplete.any():
        log.warning(
            "%d rows have more than %d candidates tied (within float32 rounding) for their first"
            " neighbour; took the lowest index at the least distance among them",
            int(incomplete.sum()),
            _MAX_K,
        )
    log.debug("first neighbours of %d x %d in %.2fs", n, x.shape[1], time.perf_counter() - t0)
    return nn, best


def first_neighbour_recall(
    x: np.ndarray, nn: np.ndarray, *, sample: int = 1000, seed: int = 0
) -> float:
    """Fraction of sampled rows whose ``nn`` is an exact first neighbour of ``x``.

    Exact first neighbours of ``sample`` random rows are computed against the whole bank with
    faiss ``IndexFlatIP``; a returned neighbour counts as correct when its cosine similarity
    equals the exact best one (so ties are not counted as misses).
    """
    n = x.shape[0]
    if n < 2:
        return 1.0
    xn = np.ascontiguousarray(normalize_rows(np.asarray(x, dtype=np.float32)))
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(n, sample), replace=False))
    sims, idx = _faiss_exact_topk(xn, min(n, 2), rows)
    best = np.where(idx[:, 0] == rows, sims[:, 1], sims[:, 0])
    got = np.einsum("nd,nd->n", xn[rows], xn[nn[rows]])
    # Same dot product, different summation order in BLAS vs einsum: allow a few float32 ulps.
    return float(np.mean(got >= best - 1e-6))
