"""vidssl FINCH against finch-clust 0.2.3: time, peak memory, agreement and first-neighbour recall.

Every run happens in a fresh subprocess so that its peak RSS (``ru_maxrss``, which counts faiss
and BLAS buffers that tracemalloc misses) belongs to that run alone. Features are Gaussian blobs
on the unit sphere (``N / 100`` blobs, noise of norm ``--spread`` around each unit centre),
generated identically in every child from a seed.

    .venv/bin/python benchmarks/clustering.py --quick           # N = 5k, d = 128
    .venv/bin/python benchmarks/clustering.py                   # N = 10k..100k, d = 128, 512
    .venv/bin/python benchmarks/clustering.py --sizes 1000000 --dims 128 --impls vidssl-ivf

Implementations: ``data`` (only generates the features: the memory floor), ``vidssl`` (exact
first neighbours: the pruned exact search from 10k rows, else faiss brute force),
``vidssl-ivf`` (opt-in IVF index) and ``finch-clust`` (its defaults:
exact pairwise distances up to 20k points, pynndescent with k = 2 above; ``pip install
pynndescent`` for that). ARI is taken against exact vidssl FINCH (itself identical to
finch-clust where finch-clust is exact) on the finest level and the level nearest to the number
of blobs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np


def blobs(n: int, d: int, seed: int = 0, spread: float = 0.3) -> np.ndarray:
    """``n x d`` float32 Gaussian blobs around ``n // 100`` random unit centres, chunked."""
    rng = np.random.default_rng(seed)
    k = max(10, n // 100)
    centres = rng.standard_normal((k, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, 65536):
        hi = min(n, lo + 65536)
        lab = rng.integers(0, k, hi - lo)
        noise = rng.standard_normal((hi - lo, d), dtype=np.float32)
        out[lo:hi] = centres[lab] + (spread / np.sqrt(d)) * noise
    return out


def child(impl: str, n: int, d: int, out_path: str, spread: float = 0.3) -> None:
    """Run one implementation on one size and write a JSON record (and the labels)."""
    x = blobs(n, d, spread=spread)
    rec = {"impl": impl, "n": n, "d": d, "spread": spread}
    # Each child imports only what its implementation needs, before the clock starts (importing
    # finch-clust with pynndescent installed JIT-compiles numba code for about a minute); the
    # imports' memory does count in the peak RSS.
    if impl.startswith("vidssl"):
        import logging

        from vidssl.clustering import finch

        # Which exact search level 0 took (pruned or brute force) and its share of the N x N
        # products, from the debug log of vidssl.clustering.neighbours.
        searches: list = []
        handler = logging.Handler(logging.DEBUG)
        handler.emit = lambda r: searches.append(r.getMessage())  # type: ignore[method-assign]
        nb_log = logging.getLogger("vidssl.clustering.neighbours")
        nb_log.setLevel(logging.DEBUG)
        nb_log.addHandler(handler)
    elif impl == "finch-clust":
        warnings.simplefilter("ignore")
        from finch import FINCH
    elif impl != "data":
        raise ValueError(f"unknown impl {impl!r}")
    t0, cpu0 = time.perf_counter(), time.process_time()
    partitions, nums = None, []
    if impl.startswith("vidssl"):
        res = finch(x, neighbours="ivf" if impl == "vidssl-ivf" else "exact")
        partitions, nums = res.partitions, res.num_clusters
        rec["recall"] = res.first_neighbour_recall if impl == "vidssl-ivf" else 1.0
        rec["search"] = next((m for m in searches if m.startswith("exact top-")), None)
    elif impl == "finch-clust":
        partitions, nums, _ = FINCH(x, verbose=False)
    rec["seconds"] = time.perf_counter() - t0
    # CPU seconds of all threads: with other jobs on the machine, wall time overstates the cost.
    rec["cpu_seconds"] = time.process_time() - cpu0
    rec["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rec["num_clusters"] = [int(v) for v in nums]
    if partitions is not None:
        np.save(out_path + ".npy", partitions)
    if impl == "finch-clust" and n > 20_000:
        # finch-clust does not return its first neighbours; recompute them the way it does
        # (its clust_rank, with its default ann_threshold) after the timing and memory reading.
        from finch.finch import clust_rank

        from vidssl.clustering import first_neighbour_recall

        _, _, nn, _ = clust_rank(x, ann_threshold=20_000, random_state=0)
        rec["recall"] = first_neighbour_recall(x, nn.astype(np.int64), sample=1000)
    elif impl == "finch-clust":
        rec["recall"] = 1.0
    with open(out_path + ".json", "w") as f:
        json.dump(rec, f)


def run_child(impl: str, n: int, d: int, tmp: str, timeout: float, spread: float = 0.3):
    """Run :func:`child` in a fresh interpreter; return its record and labels (or None)."""
    path = os.path.join(tmp, f"{impl}-{n}-{d}")
    cmd = [sys.executable, __file__, "--child", impl, str(n), str(d), path, "--spread",
           str(spread)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "n": n, "d": d, "error": f"timeout {timeout:.0f}s"}, None
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        return {"impl": impl, "n": n, "d": d, "error": tail[0][:120]}, None
    with open(path + ".json") as f:
        rec = json.load(f)
    labels = np.load(path + ".npy") if os.path.exists(path + ".npy") else None
    return rec, labels


def level_near(partitions: np.ndarray, nums, target: int) -> int:
    """Index of the level whose cluster count is closest to ``target`` (log scale)."""
    return int(np.argmin([abs(np.log(v / target)) for v in nums]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small size (N = 5k, d = 128)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 20_000, 50_000, 100_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--impls", nargs="+", default=["data", "vidssl", "finch-clust"])
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--spread", type=float, default=0.3,
                        help="norm of each blob's noise around its unit centre (larger: looser)")
    parser.add_argument("--child", nargs=4, metavar=("IMPL", "N", "D", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, n, d, out = args.child
        child(impl, int(n), int(d), out, args.spread)
        return
    if args.quick:
        args.sizes, args.dims = [5_000], [128]
    from vidssl.clustering import adjusted_rand_index

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}; "
          f"load average before: {os.getloadavg()}; blob spread {args.spread}")
    header = (f"{'N':>8} {'d':>4} {'impl':<12} {'seconds':>8} {'x time':>7} {'cpu s':>8} "
              f"{'x cpu':>6} {'peak GB':>8} "
              f"{'x mem':>6} {'recall':>7} {'ARI L0':>7} {'ARI ~k':>7} {'load':>5}  levels")
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for d in args.dims:
            for n in args.sizes:
                rows = {}
                for impl in args.impls:
                    rows[impl] = run_child(impl, n, d, tmp, args.timeout, args.spread) + (
                        os.getloadavg()[0],
                    )
                # Reference for ratios: finch-clust when it ran, and exact vidssl for agreement.
                base = rows.get("finch-clust", (None,))[0]
                exact = rows.get("vidssl", (None, None))[1]
                exact_nums = rows.get("vidssl", ({},))[0].get("num_clusters")
                for impl, (rec, labels, load) in rows.items():
                    if "error" in rec:
                        print(f"{n:>8} {d:>4} {impl:<12} failed: {rec['error']}")
                        continue
                    ratio_t = ratio_c = ratio_m = ari0 = arik = "-"
                    if base and "error" not in base and impl != "finch-clust":
                        ratio_t = f"{rec['seconds'] / base['seconds']:.3f}"
                        ratio_c = f"{rec['cpu_seconds'] / base['cpu_seconds']:.3f}"
                        ratio_m = f"{rec['peak_rss_gb'] / base['peak_rss_gb']:.3f}"
                    if exact is not None and labels is not None and impl != "vidssl":
                        ari0 = f"{adjusted_rand_index(exact[:, 0], labels[:, 0]):.4f}"
                        lv = level_near(exact, exact_nums, max(10, n // 100))
                        mine = level_near(labels, rec["num_clusters"], exact_nums[lv])
                        arik = f"{adjusted_rand_index(exact[:, lv], labels[:, mine]):.4f}"
                    recall = rec.get("recall")
                    print(f"{n:>8} {d:>4} {impl:<12} {rec['seconds']:>8.2f} {ratio_t:>7} "
                          f"{rec.get('cpu_seconds', float('nan')):>8.2f} {ratio_c:>6} "
                          f"{rec['peak_rss_gb']:>8.3f} {ratio_m:>6} "
                          f"{'-' if recall is None else f'{recall:.4f}':>7} {ari0:>7} {arik:>7} "
                          f"{load:>5.2f}  {rec['num_clusters']}", flush=True)
                    if rec.get("search"):
                        print(f"{'':>14} level 0 search: {rec['search']}", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
