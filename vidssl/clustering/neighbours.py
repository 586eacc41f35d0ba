"""First-neighbour search under cosine distance, without an N x N matrix.

Exact search uses faiss ``IndexFlatIP`` on the CPU or chunked matrix products in torch (one slice
of the bank per DDP rank); IVF and HNSW indexes are an explicit opt-in for CPU-only scale.
"""

from __future__ import annotations

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


def _torch_topk_rows(
    xn: np.ndarray, start: int, stop: int, k: int, device: Any, chunk_size: int
) -> Tuple[Any, Any]:
    """Top-``k`` inner products of rows ``[start, stop)`` against the whole bank, in torch."""
    import torch

    bank = torch.from_numpy(np.ascontiguousarray(xn, dtype=np.float32)).to(device)
    sims, idx = [], []
    for lo in range(start, stop, chunk_size):
        hi = min(stop, lo + chunk_size)
        s, i = torch.topk(bank[lo:hi] @ bank.T, k, dim=1)
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

    n = xn.shape[0]
    use_dist = distributed and dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if use_dist else (0, 1)
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


def _pick_first(
    sims: np.ndarray, idx: np.ndarray, row_ids: np.ndarray, dist: Optional[np.ndarray] = None
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First neighbour of each row among its candidates: least distance, then lowest index.

    ``dist`` (float32 cosine distances of the candidates) defaults to ``clip(1 - sims, 0, 2)``
    in float32, the arithmetic of scikit-learn's ``cosine_distances`` that finch-clust uses.
    Self and missing (-1) candidates are skipped. Returns the neighbours, their distances, and a
    mask of rows whose candidates are all tied (a lower-index tie may lie beyond the list).
    """
    if dist is None:
        dist = np.clip(np.float32(1.0) - sims, np.float32(0.0), np.float32(2.0))
    dist = np.where((idx == row_ids[:, None]) | (idx < 0), np.inf, dist).astype(np.float32)
    best = dist.min(axis=1)
    tied = dist == best[:, None]
    nn = np.where(tied, idx, np.iinfo(np.int64).max).min(axis=1)
    valid = np.isfinite(dist)
    # All valid candidates tied with the best one: the list may have cut a tie short.
    saturated = (valid.sum(1) == tied.sum(1)) & (valid.sum(1) >= idx.shape[1] - 1)
    return nn, best, saturated


def _refine64(x64n: np.ndarray, idx: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
    """Cosine distances of candidates recomputed in float64 and rounded to float32.

    finch-clust averages clusters into a float64 array (float32 sums over an int64 count), so
    above level 0 its scikit-learn distances are float64 cast to float32; recomputing the few
    candidates that way reproduces its ties and its argmin exactly.
    """
    out = np.empty(idx.shape, dtype=np.float32)
    safe = np.where(idx < 0, 0, idx)
    step = max(1, 2**22 // max(1, idx.shape[1] * x64n.shape[1]))
    for lo in range(0, len(row_ids), step):
        hi = min(len(row_ids), lo + step)
        s = np.einsum("nd,nkd->nk", x64n[row_ids[lo:hi]], x64n[safe[lo:hi]])
        out[lo:hi] = np.clip(1.0 - s, 0.0, 2.0).astype(np.float32)
    return out


def first_neighbours(
    x: np.ndarray,
    *,
    neighbours: str = "exact",
    device: Any = None,
    distributed: bool = False,
    chunk_size: int = 4096,
    approx_min_points: int = 20_000,
    index_kwargs: Optional[dict] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """First neighbour (nearest other row under cosine distance) of every row of ``x``.

    Args:
        x: ``N x D`` features, float32 or float64 (not necessarily normalised). A float64 input
            has its candidates' distances recomputed in float64, as finch-clust does for the
            cluster means above level 0.
        neighbours: ``"exact"`` (default), or an approximate faiss index, ``"ivf"`` or
            ``"hnsw"``, for CPU-only scale (check :func:`first_neighbour_recall`).
        device: ``None`` for faiss on the CPU; a torch device (``"cuda"``, ``"cuda:1"``, ``"cpu"``)
            for exact chunked matrix products in torch.
        distributed: with a torch ``device`` and an initialised process group, every rank
            searches its own slice of the rows and the results are all-gathered; then EVERY rank
            must call this with the same ``x``.
        chunk_size: query rows per matrix product on the torch path (memory ``chunk_size x N``).
        approx_min_points: banks smaller than this are searched exactly even when ``neighbours``
            asks for an approximate index (exact search is cheap there).
        index_kwargs: keyword arguments of :func:`build_approximate_index`.

    Returns:
        ``(nn, dist)``: ``int64 N`` first-neighbour indices and their float32 cosine distances.
        Ties are broken by the lowest index (like ``np.argmin`` over a distance row); a row
        never is its own neighbour unless ``N == 1``.
    """
    if neighbours not in NEIGHBOUR_METHODS:
        valid = ", ".join(NEIGHBOUR_METHODS)
        raise ValueError(f"unknown neighbours={neighbours!r}; valid: {valid}")
    n = x.shape[0]
    if n == 1:
        return np.zeros(1, dtype=np.int64), np.full(1, np.inf, dtype=np.float32)
    precise = x.dtype == np.float64
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
        sims, idx = _faiss_exact_topk(xn, k)
    dist = _refine64(xn_ref, idx, row_ids) if precise else None
    nn, best, saturated = _pick_first(sims, idx, row_ids, dist)
    saturated &= k < n  # every row was a candidate: nothing lies beyond the list
    # Exact search only: rows whose candidate list is all ties are searched again with a longer
    # list until the tie is resolved (duplicates), so the lowest tied index always wins.
    while not approx and saturated.any() and k < min(n, _MAX_K):
        k = min(n, _MAX_K, 4 * k)
        rows = np.flatnonzero(saturated)
        s2, i2 = _faiss_exact_topk(xn, k, rows)
        d2 = _refine64(xn_ref, i2, rows) if precise else None
        nn2, best2, sat2 = _pick_first(s2, i2, rows, d2)
        nn[rows], best[rows] = nn2, best2
        saturated = np.zeros(n, dtype=bool)
        saturated[rows[sat2]] = k < n
    if not approx and saturated.any():
        log.warning(
            "%d rows have more than %d tied first neighbours; took the lowest tied index found",
            int(saturated.sum()),
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
